"""The shard builder on real photos and toy-world MP4s: annotation wiring, rejects, video sampling and tracking."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from skimage.data import astronaut

from blendexp.data.annotate import choose_face
from blendexp.data.build import build
from blendexp.data.datamodule import read_tars
from blendexp.data.format import FaceSample, decode_sample, vae_latents
from blendexp.data.inputs import list_inputs
from blendexp.data.packing import brace_form
from blendexp.faces.align import align_ffhq, arcface_crop
from blendexp.faces.detect import Face, MTCNNDetector
from blendexp.faces.expression import load_smirk, prepare_smirk_input
from blendexp.faces.identity import ArcFaceONNX
from blendexp.faces.landmarks import FaceMesh, alignment_points
from blendexp.flame import EXP_DIM, ID_DIM
from blendexp.images import write_video
from blendexp.models.tiny import tiny_vae
from tests.conftest import run_cli
from tests.data.conftest import INSIGHTFACE_IMAGES, build_config


def samples(out: Path, source: str) -> list[FaceSample]:
    """Every sample of one source's shards, decoded through the shard contract."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [decode_sample(raw) for raw in read_tars(manifest["sources"][source]["shards"])]


def rejects(out: Path) -> list[dict]:
    """Parsed rejects.jsonl."""
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def photo_build(tmp_path_factory: pytest.TempPathFactory, photos: Path, annotators: Path) -> Path:
    """Real photos through MTCNN, FFHQ alignment at 128 px, tiny ArcFace and SMIRK, into shards."""
    out = tmp_path_factory.mktemp("photo_build")
    build(build_config(out, {"photos": photos}, annotators, "face.size=128", "face.min_size=40"))
    return out


def test_real_photos_become_contract_samples(photo_build: Path, annotators: Path) -> None:
    got = {s.subject: s for s in samples(photo_build, "photos")}
    assert sorted(got) == ["eileen", "tom"]
    s = got["eileen"]
    assert s.key == "photos/eileen/astronaut/000000" and s.image.shape == (128, 128, 3)
    assert s.id_emb.shape == (ID_DIM,) and abs(np.linalg.norm(s.id_emb) - 1) < 1e-5 and s.exp.shape == (EXP_DIM,)
    assert s.meta["clip"] is None and s.meta["frame"] == 0 and s.meta["path"] == "eileen/astronaut.png"
    assert s.meta["id_model"].startswith("arcface:arcface.onnx:") and s.meta["exp_model"].startswith("smirk:")
    # The builder's vectors and crop are exactly what the annotators give on the detected face: FFHQ alignment and
    # SMIRK's crop from the face mesh (the official rule), ArcFace's crop from the detector's five points.
    photo = astronaut()
    face = FaceMesh().attach(photo, MTCNNDetector(min_score=0.45).detect(photo)[0])
    assert s.meta["smirk_crop"] == "mesh" and face.dense is not None
    assert np.abs(s.image.astype(int) - align_ffhq(photo, alignment_points(face), 128)).mean() < 3  # JPEG only
    ref_id = ArcFaceONNX(annotators / "antelopev2" / "arcface.onnx").embed(arcface_crop(photo, face.landmarks5)[None])
    assert float(ref_id[0] @ s.id_emb) > 0.9999
    with torch.no_grad():
        ref_exp = load_smirk(annotators / "smirk" / "SMIRK_em1.pt")(prepare_smirk_input(photo, face.dense))[0]
    np.testing.assert_allclose(s.exp, ref_exp.numpy(), atol=1e-4)


def test_rejects_name_file_and_reason(photo_build: Path, photos: Path) -> None:
    by_name = {Path(r["path"]).name: r for r in rejects(photo_build)}
    assert by_name["t1.jpg"]["reason"] == "several faces"
    assert by_name["mask.jpg"]["reason"] == "no face"
    assert by_name["broken.jpg"]["reason"] == "decode error" and by_name["broken.jpg"]["path"] == str(
        photos / "nobody" / "broken.jpg")
    assert by_name["thumb.png"]["reason"] == "too small"  # not "no face": the detector never had a chance
    assert by_name["thumb.png"]["detail"] == "image 32x32 px < face.min_size 40"
    assert all(r["frame"] is None and r["source"] == "photos" for r in by_name.values())
    full = json.loads((photo_build / "manifest.json").read_text())
    assert full["toy_models"].startswith("tiny random ArcFace/SMIRK")  # real photos, tiny annotators: said so
    assert full["warnings"] == [f"inputs sources.photos read with {full['toy_models']}: they were never trained on "
                                "real faces, so identity and expression values of real photos mean nothing; give the "
                                "real weights (paths.models=<official models folder>)"]
    manifest = full["sources"]["photos"]
    assert manifest["samples"] == 2 and manifest["subjects"] == {"eileen": 1, "tom": 1} and manifest["clips"] == {}
    stats = json.loads((photo_build / "stats.json").read_text())["sources"]["photos"]
    assert full["smirk_crop"] == "mesh" and stats["smirk_box_crops"] == 0  # the mesh found both faces
    assert stats["inputs"] == 6 and stats["rejects"] == {"no face": 1, "several faces": 1, "decode error": 1,
                                                         "too small": 1}


def test_list_file_with_subjects_and_missing_entry(tmp_path: Path, photos: Path, annotators: Path) -> None:
    listing = tmp_path / "faces.txt"
    listing.write_text(f"# path<TAB>subject\n{photos}/tom/hanks.png\tthomas\n{photos}/gone.png\tghost\n")
    out = tmp_path / "out"
    build(build_config(out, {"listed": listing}, annotators))
    assert [s.key for s in samples(out, "listed")] == ["listed/thomas/hanks/000000"]
    (gone,) = rejects(out)
    assert gone["path"] == f"{photos}/gone.png" and gone["reason"] == "decode error"


def test_missing_or_empty_input_folder_fails_naming_it(tmp_path: Path, annotators: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"sources.raw.inputs: {tmp_path}/nope does not exist"):
        build(build_config(tmp_path / "out", {"raw": tmp_path / "nope"}, annotators))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no images .* found at {tmp_path}/empty"):
        build(build_config(tmp_path / "out", {"raw": tmp_path / "empty"}, annotators))


def test_video_stride_cap_and_clip_ids(tmp_path: Path, toy_videos: Path, annotators: Path) -> None:
    out = tmp_path / "out"
    build(build_config(out, {"clips": toy_videos}, annotators, "video.stride=3", "video.max_frames=3",
                       "face.min_score=0.7"))
    got = samples(out, "clips")
    assert [s.key for s in got] == [f"clips/s{i}/c00/{f:06d}" for i in (1, 5) for f in (0, 3, 6)]
    assert {s.meta["clip"] for s in got} == {"c00"} and [s.meta["frame"] for s in got[:3]] == [0, 3, 6]
    manifest = json.loads((out / "manifest.json").read_text())["sources"]["clips"]
    assert manifest["clips"] == {"s1/c00": 3, "s5/c00": 3} and manifest["subjects"] == {"s1": 3, "s5": 3}
    assert json.loads((out / "stats.json").read_text())["sources"]["clips"]["frames"] == 6


def test_undecodable_video_is_a_reject(tmp_path: Path, annotators: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "raw" / "s").mkdir(parents=True)
    (tmp_path / "raw" / "s" / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 and then nothing")
    result = build(build_config(tmp_path / "out", {"vid": tmp_path / "raw"}, annotators))
    (bad,) = rejects(tmp_path / "out")
    assert bad["reason"] == "decode error" and bad["frame"] == 0 and bad["path"].endswith("bad.mp4")
    assert result["manifest"]["sources"]["vid"]["samples"] == 0 and "produced no samples" in caplog.text


def _two_people_video(path: Path) -> Path:
    """Astronaut (left) and Tom Hanks (right, growing past her size); frame 3 hides the astronaut."""
    hanks = cv2.imread(str(INSIGHTFACE_IMAGES / "Tom_Hanks_54745.png"))[:, :, ::-1]
    left = cv2.resize(astronaut()[20:260, 130:370], (180, 180))
    frames = []
    for t in range(6):
        frame = np.full((240, 400, 3), 90, np.uint8)
        if t != 3:
            frame[20:200, 10:190] = left
        side = int(70 + 28 * t)  # Hanks' face outgrows hers from about frame 3 on
        frame[10:10 + side, 390 - side:390] = cv2.resize(hanks, (side, side))
        frames.append(frame)
    return write_video(path, frames, fps=10)


def test_video_tracks_the_first_largest_face(tmp_path: Path, annotators: Path) -> None:
    _two_people_video(tmp_path / "raw" / "pair" / "talk.mp4")
    out = tmp_path / "out"
    build(build_config(out, {"vid": tmp_path / "raw"}, annotators))
    got = samples(out, "vid")
    assert [s.meta["frame"] for s in got] == [0, 1, 2, 4, 5]
    assert all((s.meta["bbox"][0] + s.meta["bbox"][2]) / 2 < 200 for s in got), "must stay on the left person"
    (lost,) = rejects(out)
    assert lost["frame"] == 3 and lost["reason"] == "no face" and "tracked face lost" in lost["detail"]


def _face(x: float, y: float, side: float, score: float = 0.99) -> Face:
    """A detection record with a square box (for the selection rules)."""
    return Face(np.array([x, y, x + side, y + side], np.float32), score, np.zeros((5, 2), np.float32))


@pytest.mark.parametrize("faces, reason", [
    ([], "no face"),
    ([_face(0, 0, 100, score=0.6)], "low score"),
    ([_face(0, 0, 30)], "too small"),
    ([_face(0, 0, 100), _face(200, 0, 60)], "several faces"),  # 0.36 of the area >= 0.25
    ([_face(0, 0, 100), _face(200, 0, 40)], None),  # a small background face is fine
    ([_face(0, 0, 100), _face(200, 0, 100, score=0.5)], None),  # an unconfident rival does not count
])
def test_face_selection_rules(faces: list[Face], reason: str | None) -> None:
    face, got, _ = choose_face(faces, min_score=0.9, min_size=64, several_ratio=0.25)
    assert got == reason
    assert (face is not None) == (reason in (None, "too small"))


def test_inputs_get_unique_safe_names(tmp_path: Path) -> None:
    for name in ("a.b.jpg", "a.b.png", "x y.jpg"):
        (tmp_path / "sub.1").mkdir(exist_ok=True)
        (tmp_path / "sub.1" / name).write_bytes(b"")
    items = list_inputs("s", {"inputs": str(tmp_path)})
    assert [(i.subject, i.name) for i in items] == [("sub_1", "a_b"), ("sub_1", "a_b-2"), ("sub_1", "x_y")]


def test_subjects_of_flat_folders_subfolders_and_subject_maps(tmp_path: Path) -> None:
    for rel in ("ann.jpg", "bob.jpg", "carl/1.jpg", "carl/2.jpg", "dan.jpg"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    subjects = lambda **opts: [i.subject for i in list_inputs("s", {"inputs": str(tmp_path), **opts})]  # noqa: E731
    assert subjects() == ["ann", "bob", "carl", "carl", "dan"]  # stills directly in the folder: one subject each
    assert subjects(subject="parent") == [tmp_path.name] * 2 + ["carl"] * 2 + [tmp_path.name]
    table = tmp_path / "subjects.csv"
    table.write_text("file,subject\nann.jpg,anna\ncarl/2.jpg,anna\n")
    assert subjects(subject_map=str(table)) == ["anna", "bob", "carl", "anna", "dan"]
    mapping = tmp_path / "subjects.json"
    mapping.write_text(json.dumps({"bob.jpg": "anna", "dan.jpg": "anna"}))
    assert subjects(subject_map=str(mapping)) == ["ann", "anna", "carl", "carl", "anna"]
    table.write_text("ann.jpg\n")
    with pytest.raises(ValueError, match="subject_map: .*subjects.csv line 1 is not 'file,subject'"):
        subjects(subject_map=str(table))
    with pytest.raises(FileNotFoundError, match="subject_map: .*missing.csv does not exist"):
        subjects(subject_map=str(tmp_path / "missing.csv"))


def test_brace_form() -> None:
    assert brace_form([f"/d/x-{i:06d}.tar" for i in range(13)]) == "/d/x-{000000..000012}.tar"
    assert brace_form(["/d/x-000003.tar"]) == "/d/x-000003.tar"
    assert brace_form(["/d/x-000000.tar", "/d/x-000001.tar", "/d/x-000012.tar"]) == ""  # a range would add 2..11


def test_shards_go_to_any_webdataset_url(tmp_path: Path, toy_videos: Path, annotators: Path) -> None:
    remote = tmp_path / "bucket"
    remote.mkdir()
    url = f"pipe:cat > {remote}/{{source}}-{{index:06d}}.tar"
    result = build(build_config(tmp_path / "out", {"clips": toy_videos}, annotators, "video.max_frames=2",
                                "shard.maxcount=3", f"shard_url='{url}'", "face.min_score=0.7"))
    assert sorted(p.name for p in remote.iterdir()) == ["clips-000000.tar", "clips-000001.tar"]
    assert result["manifest"]["sources"]["clips"]["brace"] == f"pipe:cat > {remote}/clips-{{000000..000001}}.tar"
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").rglob("*.tmp"))
    assert [len(list(read_tars([str(p)]))) for p in sorted(remote.iterdir())] == [3, 1]


def test_vae_latents_are_cached_for_each_face(tmp_path: Path, toy_videos: Path, annotators: Path) -> None:
    # latents.vae (an AutoencoderKL folder, as in an SD 1.5 download) stores each face's scaled posterior mean, so
    # training reads latents instead of encoding pixels; without it no latents are written
    torch.manual_seed(0)
    tiny_vae(4).save_pretrained(tmp_path / "vae")
    build(build_config(tmp_path / "out", {"clips": toy_videos}, annotators, "video.max_frames=2",
                       "face.min_score=0.7", "face.jpeg_quality=100", f"latents.vae={tmp_path / 'vae'}"))
    got = samples(tmp_path / "out", "clips")
    assert len(got) == 4 and all(s.latents is not None and s.latents.shape == (4, 8, 8) for s in got)
    lat = np.stack([s.latents for s in got]).reshape(4, -1)
    # the stored faces differ from the encoded ones by JPEG's rounding, about as much as a clip's next frame does:
    # each face's latents are nearest its own stored face's, at the same scale (the posterior mean, scaled)
    ref = vae_latents(AutoencoderKL.from_pretrained(tmp_path / "vae"), np.stack([s.image for s in got])).reshape(4, -1)
    corr = np.corrcoef(lat, ref)[:4, 4:]
    assert list(corr.argmax(axis=1)) == [0, 1, 2, 3] and corr.diagonal().min() > 0.95
    assert abs(lat.std() / ref.std() - 1) < 0.05
    build(build_config(tmp_path / "plain", {"clips": toy_videos}, annotators, "video.max_frames=2",
                       "face.min_score=0.7"))
    assert all(s.latents is None for s in samples(tmp_path / "plain", "clips"))


def test_unreadable_folder_is_a_reject(tmp_path: Path, photos: Path, annotators: Path) -> None:
    inputs, out = tmp_path / "raw", tmp_path / "out"
    shutil.copytree(photos / "tom", inputs / "tom")
    shutil.copytree(photos / "eileen", inputs / "locked")
    (inputs / "locked").chmod(0)
    res = run_cli("blendexp.data.build", f"out={out}", "num_workers=0", "face.detector=mtcnn",
                  f"tiny_annotators={annotators}", "identity.path=null", "expression.smirk=null", "face.size=64",
                  "face.min_size=24", f"+sources.raw.inputs={inputs}", unprivileged=True)
    assert res.returncode == 0, res.stderr[-3000:]
    (locked,) = rejects(out)
    assert locked["path"] == str(inputs / "locked") and locked["reason"] == "unreadable"
    stats = json.loads((out / "stats.json").read_text())["sources"]["raw"]
    assert stats["inputs"] == 2 and stats["samples"] == 1 and stats["rejects"] == {"unreadable": 1}


def test_unknown_smirk_crop_rule_fails_before_any_worker(tmp_path: Path, photos: Path, annotators: Path) -> None:
    with pytest.raises(ValueError, match="expression.crop='dlib'; choose one of mesh, box"):
        build(build_config(tmp_path, {"photos": photos}, annotators, "expression.crop=dlib", "num_workers=2"))
    assert not list(tmp_path.glob("*.tar"))
