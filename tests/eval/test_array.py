"""Evaluations as array jobs: parts on SLURM (or in turn in one process), merged into the numbers of one run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from blendexp.eval import suite
from blendexp.evaluate import evaluate
from tests.conftest import REPO
from tests.eval.conftest import SHRINK, eval_config

# 2 sources x 2 targets x 2 samples = 8 images per method, scored in batches of 3, 3 and 2: part 0 gets the first, part
# 1 the other two.
SMALL = (*SHRINK, "eval.sources.limit=2", "eval.targets.limit=2", "eval.batch_size=3", "~eval.methods.expr_ref")


def common(tiny_base, tiny_annotators: Path) -> list[str]:
    """The shrunk embedded default on the tiny base and annotators."""
    return [f"paths.tiny_base={tiny_base[0].parent}", f"eval.annotators.tiny_root={tiny_annotators}", *SMALL]


def test_missing_part_is_named_and_partial_merge_says_so(tmp_path: Path, tiny_base, tiny_annotators: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def cfg(*overrides: str):
        return eval_config(tmp_path, *common(tiny_base, tiny_annotators), "array.size=2", f"array.dir={tmp_path}",
                           *overrides)

    assert evaluate(cfg("array.index=1")) == {}
    with pytest.raises(ValueError, match=r"1 of 2 parts are incomplete: part 0 .*not finished .*array.allow_partial"):
        evaluate(cfg("array.index=merge"))

    def lost(*args, **kwargs):  # part 0's node goes away while it generates
        raise RuntimeError("node lost")

    with monkeypatch.context() as patch:
        patch.setattr(suite, "generate_missing", lost)
        with pytest.raises(RuntimeError, match="node lost"):
            evaluate(cfg("array.index=0"))
    with pytest.raises(ValueError, match=r"part 0 .*: failed: RuntimeError: node lost"):
        evaluate(cfg("array.index=merge"))
    assert not (tmp_path / "results.csv").exists()
    evaluate(cfg("array.index=merge", "array.allow_partial=true"))
    results = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert list(results["images"]) == [5, 5]  # part 1: its batches of 3 and 2
    assert "partial array merge: 1 of 2 parts missing (part 0: failed: RuntimeError: node lost)" in (
        tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="array.index must be 0..1"):
        evaluate(cfg("array.index=2"))


@pytest.mark.slow  # two SLURM array tasks and the merge as CLI processes, then one in-process run: ~1.5 min
def test_slurm_parts_merge_to_the_numbers_of_one_process(slurm: str, tmp_path: Path, tiny_base,
                                                         tiny_annotators: Path) -> None:
    run = tmp_path / "run"
    args = [f"paths.outputs={tmp_path}", *common(tiny_base, tiny_annotators), "array.size=2", f"array.dir={run}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}

    def cli(*more: str, multirun: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "blendexp.evaluate", *multirun, *args, *more], cwd=REPO,
                              text=True, capture_output=True, timeout=900, env=env)

    res = cli("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
              f"hydra.sweep.dir={tmp_path}/sweep", "array.index=0,1", multirun=("-m",))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    logs = sorted((tmp_path / "sweep" / ".submitit").glob("*_*/*_log.out"))
    assert len(logs) == 2 and len({p.parent.name.split("_")[0] for p in logs}) == 1, logs  # one array job
    assert all("evaluated in" in p.read_text() for p in logs)
    res = cli("array.index=merge")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "part 0 of 2" in res.stdout + res.stderr and "part 1 of 2" in res.stdout + res.stderr  # progress per part
    merged, merged_readings = pd.read_csv(run / "results.csv"), pd.read_csv(run / "expression_per_image.csv")

    # One process on the same generations (it generates nothing): every number, intervals and FID/KID included.
    evaluate(eval_config(run, *common(tiny_base, tiny_annotators)))
    single = pd.read_csv(run / "results.csv")
    assert list(merged["images"]) == [8, 8]
    pd.testing.assert_frame_equal(merged, single, check_exact=True)
    pd.testing.assert_frame_equal(merged_readings, pd.read_csv(run / "expression_per_image.csv"), check_exact=True)
