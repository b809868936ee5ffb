"""Shared fixtures: a tiny Arc2Face base in the official layout, small toy-world shards, the local SLURM cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
# The longest files (the quick toy build, the reduced closed loop, the real-size recipes: minutes each) start first,
# so each runs beside the rest of the suite instead of after it (pyproject's --no-loadscope-reorder keeps this order:
# xdist otherwise hands out the files with the most tests first).
LONGEST_FIRST = ("tests/toyworld/test_assets.py", "tests/eval/test_closed_loop.py", "tests/models/test_full_size.py")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core already fills the machine: each worker and the commands it starts compute on one thread
    # (two OpenMP threads per worker on two cores spin against each other: the quick build took 3x its time).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the longest files first (a stable sort: the rest keeps its order)."""
    items.sort(key=lambda item: next((i for i, path in enumerate(LONGEST_FIRST) if item.nodeid.startswith(path)),
                                     len(LONGEST_FIRST)))


@pytest.fixture(scope="session")
def slurm() -> Iterator[str]:
    """SLURM_CONF of a running cluster: started here unless .ci/run already did (then left running). A cluster that
    cannot be started fails the test; sweeps on SLURM are a feature, not an optional extra."""
    res = subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh")], capture_output=True, text=True, timeout=900)
    found = re.search(r"export SLURM_CONF=(\S+)", res.stdout)
    if res.returncode != 0 or not found:
        pytest.fail(f"could not start the local SLURM cluster with {SLURM_SCRIPTS / 'start.sh'} (it needs root to "
                    f"install slurm-wlm and munge, and free ports 6817-6818):\n{res.stdout}\n{res.stderr[-3000:]}")
    os.environ["SLURM_CONF"] = found.group(1)
    yield found.group(1)
    if "already running" not in res.stderr:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models dir, SD 1.5 dir) of a tiny random base written by the project's own factory."""
    from blendexp.models.tiny import ensure_tiny_base

    return ensure_tiny_base(tmp_path_factory.mktemp("tiny"))


def write_toy_shards(out: Path) -> Path:
    """train-*.tar (6 subjects × 4) and val-000000.tar (2 subjects × 4) toy faces at 64 px in ``out``."""
    from blendexp.toyworld.shards import write_split

    write_split(out, "train", range(6), 4, 64, seed=0, per_shard=12)
    write_split(out, "val", range(6, 8), 4, 64, seed=0, per_shard=100)
    return out


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test shards of ``write_toy_shards``, written once per session."""
    return write_toy_shards(tmp_path_factory.mktemp("toy_shards"))


def run_cli(module: str, *overrides: str, cwd: Path | None = None, timeout: int = 600,
            unprivileged: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <overrides>`` as a user would and capture its output; ``unprivileged``: without
    root's right to read any file (so unreadable-path tests mean the same under root as for a user)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if unprivileged and os.geteuid() == 0 else []
    return subprocess.run([*drop, sys.executable, "-m", module, *overrides], cwd=cwd or REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def kill_when(module: str, args: list[str], ready: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``python -m <module> <args>`` and SIGKILL it with its children (loader workers, DDP ranks) as soon as
    ``ready()`` holds: a fault injected at a chosen point of a user's command."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and not ready():
        time.sleep(0.005)
    finished = proc.poll() is not None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not finished, f"{module} ended (status {proc.returncode}) before the point where it was to be killed"


def single_torch_thread_fixture() -> Callable[[], Iterator[None]]:
    """An autouse fixture for a package of small CPU models (MTCNN, tiny annotators): one torch thread for it, since
    OpenMP's busy-waiting on a shared CI box made them 2-10x slower."""

    @pytest.fixture(scope="package", autouse=True)
    def single_torch_thread() -> Iterator[None]:
        """One torch thread while this package's tests run."""
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(previous)

    return single_torch_thread


def missed_thresholds(figures: dict[str, float], thresholds: dict[str, tuple[str, float]]) -> list[str]:
    """Every figure that misses its threshold (``(op, limit)``, op one of > >= < <=), as readable lines."""
    ops = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}
    return [f"{name} = {figures[name]:.4f}, expected {op} {limit}" for name, (op, limit) in thresholds.items()
            if not ops[op](float(figures[name]), float(limit))]
