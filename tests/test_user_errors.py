"""Bad input to the user's commands: exit status 1, one ``error:`` line naming the option or path, no traceback;
most of these fail before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


class Evil:
    """Anything ``torch.load(weights_only=True)`` must refuse: unpickling it would run arbitrary code."""


def one_error(res, *fragments: str) -> str:
    """The single ``error:`` line of a failed command (progress bars may share stderr), checked for fragments."""
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "\\n" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def text_jpg(tmp_path: Path) -> Path:
    """A text file named like a photo."""
    path = tmp_path / "face.jpg"
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize("option, value, fragment", [
    ("expression_scale", "nan", "expression_scale=nan is out of range"),
    ("seed", "1e30", "seed=1e+30 is out of range"),
    ("steps", "0", "steps=0 is out of range"),
    ("size", "abc", "size='abc' is not a number"),
    ("samples", "-1", "samples=-1 is out of range"),
])
def test_generate_refuses_out_of_range_numbers(tmp_path: Path, option: str, value: str, fragment: str) -> None:
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", "run_name=bad", f"{option}={value}")
    one_error(res, fragment)
    assert not (tmp_path / "generate" / "bad" / "settings.json").exists()  # refused before anything is written


@pytest.mark.parametrize("option", ["identity", "expression", "reference_image"])
def test_generate_names_an_image_that_does_not_decode(tmp_path: Path, text_jpg: Path, option: str) -> None:
    extra = ["reference=true"] if option == "reference_image" else []
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", f"{option}={text_jpg}", *extra)
    one_error(res, f"{text_jpg} does not decode as an image")


def test_generate_names_an_unreadable_identity(tmp_path: Path, text_jpg: Path) -> None:
    locked = tmp_path / "locked.png"
    locked.write_bytes(b"")
    locked.chmod(0)
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", f"identity={locked}", unprivileged=True)
    one_error(res, f"identity image {locked} cannot be read (permission denied)")


def test_generate_refuses_a_checkpoint_that_needs_unpickling(tmp_path: Path) -> None:
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, evil)
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", f"expression_adapter={evil}", "samples=1",
                  "steps=1", "expression=neutral", "paths.models=/nonexistent")  # refused before any base loads
    one_error(res, f"{evil} is not a weights-only checkpoint")


def test_train_refuses_to_resume_from_a_checkpoint_that_needs_unpickling(tmp_path: Path) -> None:
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "payload": Evil()}, evil)
    res = run_cli("blendexp.train", "+experiment=expr_adapter", f"paths.outputs={tmp_path}", "run_name=evil",
                  f"ckpt_path={evil}", "trainer.max_steps=1")
    one_error(res, f"{evil} is not a weights-only checkpoint")


def test_generate_names_a_missing_models_folder_in_one_line(tmp_path: Path) -> None:
    res = run_cli("blendexp.generate", f"paths.outputs={tmp_path}", "paths.models=/nonexistent")
    one_error(res, "pipeline: Arc2Face base incomplete: missing /nonexistent/arc2face/config.json", "expected layout")


def test_train_names_a_config_key_of_the_wrong_type(tmp_path: Path) -> None:
    res = run_cli("blendexp.train", "+experiment=expr_adapter", f"paths.outputs={tmp_path}", "run_name=typo",
                  "trainer.max_steps=abc")
    one_error(res, "trainer.max_steps='abc' has the wrong type; expected int")
    result = json.loads((tmp_path / "expr_adapter" / "typo" / "result.json").read_text())
    assert result["status"] == "failed"


def test_evaluate_names_an_unreadable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "faces"
    locked.mkdir()
    locked.chmod(0)
    res = run_cli("blendexp.evaluate", f"paths.outputs={tmp_path}", f"eval.sources.path={locked}",
                  unprivileged=True)
    one_error(res, f"eval.sources.path: {locked} cannot be read (permission denied)")


def test_evaluate_refuses_a_nan_scale(tmp_path: Path) -> None:
    res = run_cli("blendexp.evaluate", f"paths.outputs={tmp_path}", "eval.methods.expr_adapter.scale=nan")
    one_error(res, "eval.methods.expr_adapter.scale=nan is out of range")
