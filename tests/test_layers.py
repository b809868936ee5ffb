"""The layers hold: `lint-imports` keeps the contracts in pyproject.toml, and breaks them when a module imports upward,
an entry point imports the toy world, something imports the builder's entry point, Lightning reaches the image
helpers or the toy world, or a new top-level module is not placed in a layer (each checked on a copy of the package
with that one change)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` on the ``blendexp`` package found in ``root`` with ``root``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}  # before the editable install's finder, so the copy is analysed
    return subprocess.run([str(LINT), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_package_keeps_every_layer_contract() -> None:
    res = lint(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 kept, 0 broken" in res.stdout


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """The package's sources and pyproject.toml in a scratch folder, to break on purpose."""
    shutil.copytree(REPO / "blendexp", tmp_path / "blendexp", ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


@pytest.mark.parametrize("module, line, broken", [
    ("flame.py", "import blendexp.train", "blendexp.flame -> blendexp.train"),
    ("faces/detect.py", "from blendexp.data import format", "blendexp.faces.detect -> blendexp.data.format"),
    ("pipeline.py", "import blendexp.eval.suite", "blendexp.pipeline -> blendexp.eval.suite"),
    ("data/build.py", "from blendexp.toyworld import video", "blendexp.data.build -> blendexp.toyworld.video"),
    ("generate.py", "import blendexp.toyworld.params", "blendexp.generate -> blendexp.toyworld.params"),
    ("eval/suite.py", "import blendexp.data.build", "blendexp.eval.suite -> blendexp.data.build"),
    ("toyworld/assets.py", "import blendexp.data.build", "blendexp.toyworld.assets -> blendexp.data.build"),
    ("generate.py", "import blendexp.demo", "blendexp.generate -> blendexp.demo"),
    ("images.py", "import lightning", "blendexp.images -> lightning"),
    ("toyworld/fitting.py", "from blendexp import callbacks", "blendexp.toyworld.fitting -> blendexp.callbacks"),
], ids=["bottom imports an entry point", "faces import data", "pipeline imports eval", "builder imports toy world",
        "entry point imports toy world", "eval imports the builder", "toy world imports the builder",
        "entry points import each other", "image helpers import Lightning", "toy world imports the callbacks"])
def test_an_import_against_the_layers_is_caught(package_copy: Path, module: str, line: str, broken: str) -> None:
    path = package_copy / "blendexp" / module
    path.write_text(path.read_text() + f"\n{line}  # the violation under test\n")
    res = lint(package_copy)
    assert res.returncode == 1, res.stdout + res.stderr
    assert broken in res.stdout and "BROKEN" in res.stdout


def test_a_top_level_module_outside_every_layer_is_caught(package_copy: Path) -> None:
    (package_copy / "blendexp" / "helpers.py").write_text('"""A new module nobody placed in a layer."""\n')
    res = lint(package_copy)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "blendexp.helpers" in res.stdout
