"""The evaluation command as users run it: outputs, cached re-runs, resumption, external baselines, bad inputs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.data import astronaut, chelsea

from blendexp.evaluate import evaluate
from blendexp.faces.align import align_ffhq
from blendexp.faces.detect import MTCNNDetector
from blendexp.faces.landmarks import FaceMesh, alignment_points
from tests.conftest import kill_when, run_cli
from tests.eval.conftest import SHRINK, eval_config


def _pngs(folder: Path) -> dict[Path, float]:
    """Generated images and their modification times."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}


@pytest.mark.slow
def test_default_command_writes_report_and_reruns_from_cache(tmp_path: Path, tiny_base, tiny_annotators: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    common = [f"paths.tiny_base={tiny_base[0].parent}", f"eval.annotators.tiny_root={tiny_annotators}", *SHRINK]
    res = run_cli("blendexp.evaluate", f"paths.outputs={tmp_path}", "logger=wandb", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "evaluate" / "default"
    results = pd.read_csv(run / "results.csv")
    assert list(results["method"]) == ["arc2face", "expr_adapter", "expr_ref"]
    assert (results["images"] == 3 * 3 * 2).all() and (results["id_sim"].between(-1, 1)).all()
    assert {"exp_mae_low", "exp_mae_high", "exp_mae_eyelid", "exp_mae_jaw", "fid", "kid_high"} <= set(results)
    table = (run / "results.md").read_text()
    assert "| expr_ref | 18 |" in table and "ID sim (ArcFace) ↑" in table and str(run / "results.md") in res.stdout
    assert Image.open(run / "expression_components.png").size[0] > 500
    # every image with a face, keyed, with its 55 target and read values: the components' errors recomputed from it
    readings, per_image = pd.read_csv(run / "expression_per_image.csv"), pd.read_csv(run / "per_image.csv")
    faces = per_image[per_image["face"]]
    pd.testing.assert_frame_equal(readings[["method", "source", "target", "sample"]],
                                  faces[["method", "source", "target", "sample"]].reset_index(drop=True))
    components = pd.read_csv(run / "expression_components.csv", index_col="component")
    for method, group in readings.groupby("method"):
        errors = {c: (group[f"read.{c}"] - group[f"target.{c}"]).abs().mean() for c in components.index}
        np.testing.assert_allclose(pd.Series(errors).to_numpy(), components[method].to_numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(group[[f"read.{c}" for c in components.index]].sub(
            group[[f"target.{c}" for c in components.index]].to_numpy()).abs().mean(axis=1).to_numpy(),
            faces[faces["method"] == method]["exp_mae"].to_numpy(), rtol=1e-4, atol=1e-6)
    grid = Image.open(run / "grids" / "grid_000.png")
    assert grid.size[0] == 2 + 5 * (64 + 2)  # source | target | three methods, 64 px cells
    tables = list((run / "wandb").glob("offline-run-*/files/media/table/eval/results_*.table.json"))
    assert tables and json.loads(tables[0].read_text())["data"][0][0] == "arc2face"
    assert list((run / "wandb").glob("offline-run-*/files/media/images/eval/grids_*.png"))
    # Each pair has its own noise: Arc2Face ignores the target, so one source's images differ only by their seeds.
    source = min(d for d in (run / "generations" / "arc2face").iterdir() if d.is_dir())
    one_source = sorted(source.glob("*_0.png"))
    assert len(one_source) == 3
    assert len({np.asarray(Image.open(p)).tobytes() for p in one_source}) == 3

    # Same command again (in-process) after losing one image: only that image is generated, nothing else is touched.
    before = _pngs(run / "generations")
    lost = sorted(p for p in before if "arc2face" in str(p))[5]
    original = np.asarray(Image.open(lost))
    lost.unlink()
    with caplog.at_level(logging.INFO, logger="blendexp.eval.suite"):
        metrics = evaluate(eval_config(run, *common))
    assert "arc2face: 17/18 images cached, 1 to generate" in caplog.text
    assert "expr_adapter: 18/18 images cached, 0 to generate" in caplog.text
    after = _pngs(run / "generations")
    assert after.keys() == before.keys() and all(after[p] == t for p, t in before.items() if p != lost)
    assert np.abs(np.asarray(Image.open(lost)).astype(int) - original).max() <= 1  # fixed seed, same image
    assert metrics["expr_ref/id_sim"] == pytest.approx(results.set_index("method").loc["expr_ref", "id_sim"], abs=1e-3)
    with pytest.raises(ValueError, match="generations/arc2face were made with other settings"):
        evaluate(eval_config(run, *common, "eval.generation.steps=3"))


def test_external_baseline_faceless_source_and_no_face_rate(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    sources, flame, external = tmp_path / "sources", tmp_path / "exp.npy", tmp_path / "external"
    sources.mkdir()
    face = np.asarray(Image.fromarray(astronaut()).resize((256, 256)))
    Image.fromarray(face).save(sources / "astronaut.png")
    Image.fromarray(chelsea()).save(sources / "cat.png")
    np.save(flame, np.stack([np.zeros(55), np.full(55, 0.1)]).astype(np.float32))
    detected = FaceMesh().attach(face, MTCNNDetector().detect(face)[0])
    aligned = align_ffhq(face, alignment_points(detected), 512)  # the source face as the evaluation aligns it
    for method, size in (("copies", 512), ("small", 48)):  # the documented layout: <source>/<target>_<k>.png
        (external / method / "astronaut").mkdir(parents=True)
        for target in ("exp-0", "exp-1"):
            Image.fromarray(aligned).resize((size, size)).save(external / method / "astronaut" / f"{target}_0.png")
    run = tmp_path / "run"
    # the tiny random base (its noise has no face: detected, not taken as aligned crops) and tiny annotators including
    # the second recogniser (facenet); the sources are detected by default
    cfg = eval_config(run, f"eval.base.tiny_root={tiny_base[0].parent}", f"eval.annotators.tiny_root={tiny_annotators}",
                      "eval.annotators.facenet=tiny", *SHRINK, f"eval.sources.path={sources}", f"eval.targets.path={flame}",
                      "eval.targets.offset=0", "eval.targets.limit=null",
                      "eval.generation.samples=1", "eval.annotators.generated=detect", "~eval.methods.expr_adapter",
                      "~eval.methods.expr_ref", f"+eval.methods.copies={{kind: folder, path: {external / 'copies'}}}",
                      f"+eval.methods.small={{kind: folder, path: {external / 'small'}}}")
    evaluate(cfg)
    results = pd.read_csv(run / "results.csv").set_index("method")
    assert results.loc["copies", "id_sim"] == pytest.approx(1.0, abs=1e-3)  # the source face itself, re-detected
    assert results.loc["copies", "id_sim_facenet"] == pytest.approx(1.0, abs=1e-3)
    assert results.loc["copies", "bg_l1"] == pytest.approx(0.0, abs=1e-6)  # against the aligned source, not the photo
    grid = Image.open(run / "grids" / "grid_000.png")  # 512 px source, 48 and 64 px methods: all 64 px cells
    assert grid.size[0] == 2 + 5 * (64 + 2)
    assert results.loc["copies", "no_face_rate"] == 0 and results.loc["copies", "images"] == 2
    assert results.loc["arc2face", "no_face_rate"] == 1.0  # tiny-base noise has no face: reported, not a crash
    assert np.isnan(results.loc["arc2face", "id_sim"])
    skipped = pd.read_csv(run / "skipped.csv")
    assert skipped.to_dict("records") == [{"role": "source", "origin": str(sources / "cat.png"),
                                           "reason": "no face detected"}]
    report = (run / "results.md").read_text()
    assert str(sources / "cat.png") in report
    assert f"**Warning**: photos of eval.sources.path={sources} read with tiny random ArcFace/SMIRK" in report


def test_cached_images_of_changed_inputs_are_made_again(tmp_path: Path, tiny_base, tiny_annotators: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    sources, flame, run = tmp_path / "sources", tmp_path / "exp.npy", tmp_path / "run"
    sources.mkdir()
    Image.fromarray(astronaut()).resize((256, 256)).save(sources / "astronaut.png")
    Image.fromarray(astronaut()[::-1, ::-1]).resize((256, 256)).save(sources / "upside_down.png")
    np.save(flame, np.stack([np.zeros(55), np.full(55, 0.1)]).astype(np.float32))
    common = [f"eval.base.tiny_root={tiny_base[0].parent}", f"eval.annotators.tiny_root={tiny_annotators}", *SHRINK,
              f"eval.sources.path={sources}", f"eval.targets.path={flame}", "eval.targets.offset=0",
              "eval.targets.limit=null", "eval.generation.samples=1", "~eval.methods.expr_adapter",
              "~eval.methods.expr_ref"]
    evaluate(eval_config(run, *common))
    first = _pngs(run / "generations")
    assert len(first) == 2  # the upside-down photo has no face MTCNN finds: skipped
    with caplog.at_level(logging.WARNING, logger="blendexp.eval.suite"):  # other detection, other embeddings
        evaluate(eval_config(run, *common, "eval.annotators.aligned=true"))
    again = _pngs(run / "generations")
    assert "arc2face: 2 cached images were made from other inputs (astronaut)" in caplog.text
    assert len(again) == 4 and all(again[p] != t for p, t in first.items())  # both regenerated, the new source added
    evaluate(eval_config(run, *common, "eval.annotators.aligned=true"))  # unchanged inputs: nothing is touched
    assert _pngs(run / "generations") == again


def test_external_folder_without_the_expected_names_fails(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    (tmp_path / "external" / "someone").mkdir(parents=True)
    cfg = eval_config(tmp_path / "run", f"paths.tiny_base={tiny_base[0].parent}",
                      f"eval.annotators.tiny_root={tiny_annotators}", *SHRINK, "eval.methods={}",
                      f"+eval.methods.other={{kind: folder, path: {tmp_path / 'external'}}}", "eval.annotators.facenet=null")
    with pytest.raises(FileNotFoundError, match="none of the 18 expected images"):
        evaluate(cfg)


@pytest.mark.parametrize("override, hint", [
    ("eval.fid.extractor=inception", "pytorch-fid/releases"),
    ("eval.annotators.tiny_root=null", "FoivosPar/Arc2Face"),
])
def test_missing_weights_fail_before_generating(tmp_path: Path, tiny_base, tiny_annotators: Path, override: str,
                                                hint: str) -> None:
    models = tmp_path / "no-models"
    cfg = eval_config(tmp_path / "run", f"paths.tiny_base={tiny_base[0].parent}",
                      f"eval.annotators.tiny_root={tiny_annotators}", *SHRINK, override,
                      f"eval.fid.inception_weights={models}/fid/pt_inception.pth",
                      f"eval.annotators.arcface={models}/antelopev2/arcface.onnx")
    with pytest.raises(FileNotFoundError, match=str(models)) as info:
        evaluate(cfg)
    assert hint in str(info.value)
    assert not list((tmp_path / "run").rglob("*.png"))


@pytest.mark.slow
def test_cli_names_a_flame_file_of_wrong_length(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    bad = tmp_path / "targets" / "bad.npy"
    bad.parent.mkdir()
    np.save(bad, np.zeros(54, np.float32))
    res = run_cli("blendexp.evaluate", f"paths.outputs={tmp_path}", f"paths.tiny_base={tiny_base[0].parent}",
                  f"eval.annotators.tiny_root={tiny_annotators}", f"eval.targets.path={bad.parent}")
    assert res.returncode == 1
    assert f"error: FLAME vector in {bad} has 54 values; 55 values are expected" in res.stderr


def test_official_preset_evaluates_the_released_checkpoints(tmp_path: Path) -> None:
    cfg = eval_config(tmp_path, "eval=official", "paths.models=/weights/models")
    methods = cfg.eval.methods
    assert methods.expr_adapter.adapter == "/weights/models/exp_adapter"
    assert methods.expr_ref.ref_adapter == "/weights/models/ref_adapter" and methods.arc2face.kind == "arc2face"
    assert cfg.eval.annotators.arcface == "/weights/models/antelopev2/arcface.onnx"
    assert cfg.eval.base.tiny_root is None and cfg.eval.annotators.tiny_root is None
    assert cfg.eval.fid.extractor == "inception" and cfg.run_name == "official"


@pytest.mark.slow
def test_killed_evaluation_resumes_to_the_same_results(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    # kill -9 while the second method generates; the same command again reuses every finished image (none is
    # half-written) and ends with the uninterrupted run's table
    common = [f"paths.tiny_base={tiny_base[0].parent}", f"eval.annotators.tiny_root={tiny_annotators}", *SHRINK,
              "~eval.methods.expr_ref"]
    full = run_cli("blendexp.evaluate", f"paths.outputs={tmp_path / 'full'}", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "killed" / "evaluate" / "default"
    second = run / "generations" / "expr_adapter"
    kill_when("blendexp.evaluate", [f"paths.outputs={tmp_path / 'killed'}", *common],
              lambda: len(list(second.rglob("*.png"))) >= 3)
    made = {p: t for p, t in _pngs(run / "generations").items() if not p.name.endswith(".partial.png")}
    assert 0 < len(made) < 2 * 18 and not (run / "results.csv").exists()

    again = run_cli("blendexp.evaluate", f"paths.outputs={tmp_path / 'killed'}", *common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(p.stat().st_mtime_ns == t for p, t in made.items())  # finished images were not made again
    assert not list(run.rglob("*.partial.png"))  # an image cut short by the kill was made again in full
    want = pd.read_csv(tmp_path / "full" / "evaluate" / "default" / "results.csv")
    pd.testing.assert_frame_equal(pd.read_csv(run / "results.csv"), want)
