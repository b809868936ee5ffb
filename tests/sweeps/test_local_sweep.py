"""A multirun with Hydra's basic launcher: every job records result.json, a crashing job is reported and the others
still finish, and a sweep with an unknown key stops before any job starts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.sweeps.conftest import job_overrides, results, slurm_overrides, train_cli


@pytest.mark.slow
def test_crashing_job_is_reported_and_the_other_job_finishes(toy_shards: Path, tiny_base, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    missing = tmp_path / "missing.tar"
    res = train_cli("-m", *job_overrides(toy_shards, tiny_base, tmp_path), f"hydra.sweep.dir={sweep}",
                    f"data.sources.stills.shards={missing},{toy_shards}/train-000000.tar")
    assert res.returncode == 1  # the sweep went through, then says that a job failed
    assert "1 job(s) did not complete (0)" in res.stderr
    jobs = results(sweep)
    assert jobs[0]["status"] == "failed" and f"{missing} does not exist" in jobs[0]["error"]
    assert jobs[1]["status"] == "completed" and jobs[1]["metrics"]["train/loss"] > 0
    assert (sweep / "1" / "export" / "models" / "exp_adapter" / "exp_adapter.safetensors").is_file()
    table = pd.read_csv(sweep / "report.csv")  # written when the sweep ended
    assert list(table["status"]) == ["failed", "completed"]
    assert f"{missing} does not exist" in table.loc[0, "error"] and table.loc[1, "train/loss"] > 0
    assert "**failed**" in (sweep / "report.md").read_text()


def test_unknown_key_fails_before_any_job_is_submitted(slurm: str, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    res = train_cli("-m", *slurm_overrides(), "+experiment=expr_adapter", f"hydra.sweep.dir={sweep}",
                    "model.adapter.num_tokns=4,8", timeout=300)
    assert res.returncode == 1
    assert "model.adapter.num_tokns" in res.stderr and "Traceback" not in res.stderr
    assert not (sweep / ".submitit").exists() and not list(sweep.glob("*/result.json"))
