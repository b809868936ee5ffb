"""Shared pieces for the evaluation tests: tiny annotators, composed evaluation configs, one torch thread."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from blendexp.config import CONF_DIR  # also registers the ${blendexp.*} resolvers
from blendexp.faces.annotators import Annotators, build_annotators, ensure_tiny_annotators
from tests.faces.conftest import single_torch_thread  # noqa: F401  (autouse: one torch thread for these tests too)


@pytest.fixture(scope="session")
def tiny_annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of tiny random annotators in the official formats (written once per session)."""
    root = tmp_path_factory.mktemp("tiny-annotators")
    ensure_tiny_annotators(root)
    return root


@pytest.fixture(scope="session")
def annotators(tiny_annotators: Path) -> Annotators:
    """Tiny annotators taking every image as an aligned crop (toy faces)."""
    return build_annotators({"tiny_root": str(tiny_annotators), "aligned": True, "arcface": "x",
                             "facenet": "x", "smirk": "x"})


def eval_config(out: Path, *overrides: str) -> DictConfig:
    """The real ``evaluate`` config writing to ``out``, as the command composes it with these overrides."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="evaluate", overrides=[f"out_dir={out}", *overrides])


# Shrinks the embedded default further for tests (the same list for CLI runs and composed configs, so a re-run
# finds the first run's cache manifest unchanged).
SHRINK = ("threads=1", "eval.generation.steps=2", "eval.fid.bootstrap=3", "eval.fid.kid_subsets=5")
