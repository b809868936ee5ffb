"""The generate command as users run it: images, grid, settings, reproducing from flame.npy, edits, driving images,
embeddings, transitions (GIF, MP4), and bad inputs as one line with exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from blendexp.errors import run_entry
from blendexp.generate import generate
from blendexp.images import read_video
from tests.conftest import run_cli
from tests.generate.conftest import compose_config, overrides


@pytest.mark.slow
def test_default_command_writes_images_grid_and_settings(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    common = overrides(tiny_base, tiny_annotators)
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", "run_name=default", "samples=2", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "generate" / "default"
    assert "generated 8 images (4 expressions x 2 samples)" in res.stdout and str(run / "grid.png") in res.stdout
    names = sorted(p.name for p in (run / "images").iterdir())
    assert names == sorted(f"{e}_{k}.png" for e in ("neutral", "smile", "surprise", "left_wink") for k in (0, 1))
    assert Image.open(run / "grid.png").size == (2 + 3 * 66, 2 + 4 * 66)  # identity column + 2 samples, 4 rows
    settings = json.loads((run / "settings.json").read_text())
    assert settings["expressions"]["smile"] == {"exp.0": 2.5, "exp.1": 2.5, "exp.7": 1.0}
    assert settings["seeds"] == [0, 1] and settings["identity"].endswith("val-000000.tar#toy/s00048/i000/000000")
    assert settings["pipeline"]["expression_adapter"] == "untrained (seed 0)" and settings["config"]["steps"] == 2
    # flame.npy holds the rows' vectors: feeding it back reproduces the images.
    again = tmp_path / "again"
    generate(compose_config("generate", again, *common, "samples=2", f"expression={run / 'flame.npy'}"))
    assert np.array_equal(np.asarray(Image.open(again / "images" / "flame-1_1.png")),
                          np.asarray(Image.open(run / "images" / "smile_1.png")))


def test_edits_driving_image_and_embedding(tmp_path: Path, tiny_base, tiny_annotators: Path, face_png: Path) -> None:
    emb = tmp_path / "me.npy"
    np.save(emb, np.random.default_rng(0).normal(size=512).astype(np.float32))
    flame = tmp_path / "two.json"
    flame.write_text(json.dumps([[0.0] * 55, [0.1] * 55]))
    out = tmp_path / "run"
    files = generate(compose_config("generate", out, *overrides(tiny_base, tiny_annotators), f"identity={emb}",
                                    f"expression=[{face_png},smile,{flame}]", "samples=1", "+edits.jaw.0=0.3",
                                    "aligned=true"))  # the toy face is an aligned crop
    settings = json.loads((out / "settings.json").read_text())
    assert list(settings["expressions"]) == ["toy_face", "smile", "two-0", "two-1"]
    assert all(e["jaw.0"] == 0.3 for e in settings["expressions"].values())
    assert len(settings["expressions"]["toy_face"]) > 10  # SMIRK's vector of the driving image: (nearly) all non-zero
    assert settings["identity"] == str(emb) and len(files["images"]) == 4
    assert Image.open(out / "grid.png").size == (2 + 2 * 66, 2 + 4 * 66)  # no photo: the identity column stays empty


def test_transition_writes_gif_and_mp4_from_one_noise(tmp_path: Path, tiny_base, tiny_annotators: Path) -> None:
    out = tmp_path / "run"
    files = generate(compose_config("generate", out, *overrides(tiny_base, tiny_annotators),
                                    "transition.keyframes=[smile,smile,surprise]", "transition.frames=5",
                                    "transition.fps=10", "reference=true", "edits={eyelid.1: 1.0}"))
    frames = [np.asarray(Image.open(p)) for p in files["frames"]]
    assert len(frames) == 5 and np.array_equal(frames[0], frames[2])  # same expression, same noise: same frame
    assert not np.array_equal(frames[0], frames[4])
    with Image.open(files["gif"]) as gif:  # identical frames are merged, so count time rather than frames
        assert sum(frame.info["duration"] for frame in ImageSequence.Iterator(gif)) == 5 * 100  # GIF times are in 10 ms units
    assert read_video(files["mp4"]).shape == (5, 64, 64, 3)
    assert np.load(files["flame"])[:, 51].tolist() == [1.0] * 5
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pipeline"]["reference_adapter"] == "untrained (seed 0)"
    assert settings["keyframes"]["smile"]["eyelid.1"] == 1.0


def test_unknown_preset_fails_in_one_line_from_the_cli(tmp_path: Path) -> None:
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", "expression=grin")
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown expression preset 'grin'; presets: neutral, smile, laugh, surprise, anger, "
                      "sadness, disgust, fear, contempt, left_wink, right_wink, eyes_closed, mouth_open, pucker, "
                      "puffed_cheeks, jaw_left, jaw_right (or give a driving image or a FLAME .npy/.json file)"]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("case", ["short_flame", "no_face", "reference_without_photo"])
def test_bad_inputs_fail_with_one_line_and_status_1(case: str, tmp_path: Path, tiny_base, tiny_annotators: Path,
                                                    blank_png: Path, capsys: pytest.CaptureFixture) -> None:
    short, emb = tmp_path / "short.npy", tmp_path / "id.npy"
    np.save(short, np.zeros(54, np.float32))
    np.save(emb, np.ones(512, np.float32))
    extra, message = {
        "short_flame": ([f"expression={short}"], f"error: FLAME vector in {short} has 54 values; 55 values are expected"),
        "no_face": ([f"identity={blank_png}"], f"error: no face found in {blank_png}"),
        "reference_without_photo": ([f"identity={emb}", "reference=true"], "error: reference=true needs a face photo"),
    }[case]
    with pytest.raises(SystemExit) as exit_:
        run_entry(generate, compose_config("generate", tmp_path / "run", *overrides(tiny_base, tiny_annotators), *extra))
    assert exit_.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message)
