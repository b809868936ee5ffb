"""Sweep tests: a real single-node SLURM cluster (scripts/slurm/start.sh), small train(+evaluate) jobs, their outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import REPO

T = TypeVar("T")


@pytest.fixture(scope="session")
def annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random annotators for evaluate_after, written once (jobs running in parallel must not race to)."""
    from blendexp.faces.annotators import ensure_tiny_annotators

    root = tmp_path_factory.mktemp("tiny-annotators")
    ensure_tiny_annotators(root)
    return root


def job_overrides(shards: Path, tiny: tuple[Path, Path], out: Path) -> list[str]:
    """A 2-step Expression Adapter job on the test shards and tiny base, writing under ``out``, no sample grids."""
    models, sd15 = tiny
    return ["+experiment=expr_adapter", f"data.sources.stills.shards={shards}/train-000000.tar",
            f"data.val_shards={shards}/val-000000.tar", f"paths.models={models}", f"paths.sd15={sd15}",
            f"paths.tiny_base={models.parent}", f"paths.outputs={out}", "data.num_workers=0", "data.batch_size=4",
            "trainer.max_steps=2", "~callbacks.samples"]


def eval_overrides(annotators: Path) -> list[str]:
    """evaluate_after on the smallest useful test set: 1 source x 1 target, 1 sample, 2 denoising steps."""
    return ["evaluate_after=true", f"evaluation.annotators.tiny_root={annotators}", "evaluation.sources.limit=1",
            "evaluation.targets.limit=1", "evaluation.generation.samples=1", "evaluation.generation.steps=2",
            "evaluation.fid.bootstrap=0"]


def slurm_overrides() -> list[str]:
    """The SLURM launcher with what this one-node test cluster offers: one CPU per job, both jobs at once."""
    return ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20"]


def cli_env() -> dict[str, str]:
    """The test environment for job processes: one torch thread each, so parallel jobs do not thrash 2 cores."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}


def train_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m blendexp.train <args>`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "blendexp.train", *args], cwd=REPO, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout)


def results(sweep: Path) -> dict[int, dict]:
    """job number -> that job's result.json."""
    return {r["job_num"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/result.json"))}


def wait_for(condition: Callable[[], T], timeout: float, what: str, every: float = 0.2) -> T:
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
