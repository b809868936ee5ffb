"""Sweeps on a real SLURM cluster through hydra-submitit-launcher: train then evaluate in every job, one report for
the sweep, W&B runs grouped by sweep, and a job signalled before its time limit resuming from its checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from blendexp.config import run_id
from tests.conftest import REPO
from tests.sweeps.conftest import (
    cli_env,
    eval_overrides,
    job_overrides,
    results,
    slurm_overrides,
    train_cli,
    wait_for,
)


def wandb_runs(run_dir: Path) -> list[Path]:
    """The offline W&B runs of one run folder (one per launch)."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_two_job_sweep_trains_evaluates_and_reports(slurm: str, toy_shards: Path, tiny_base, annotators: Path,
                                                    tmp_path: Path) -> None:
    sweep = tmp_path / "dropout_sweep"
    res = train_cli("-m", *slurm_overrides(), *job_overrides(toy_shards, tiny_base, tmp_path),
                    *eval_overrides(annotators), f"hydra.sweep.dir={sweep}", "model.dropout.exp=0.0,0.2",
                    "logger=wandb", "logger.wandb.tags=[sweep-test]")
    assert res.returncode == 0, res.stderr[-4000:]
    jobs = results(sweep)
    assert sorted(jobs) == [0, 1]
    for num, job in jobs.items():
        assert job["status"] == "completed" and job["slurm_job_id"], job  # ran as a SLURM job
        assert 0 < job["metrics"]["eval/id_sim"] <= 1 and job["metrics"]["eval/exp_mae"] > 0
        run = sweep / str(num)
        assert (run / "eval" / "results.csv").is_file()
        (wb,) = wandb_runs(run)
        assert wb.name.endswith(run_id(str(run)))  # the id a requeued job derives again
        record = next(wb.glob("run-*.wandb")).read_bytes()
        assert b"dropout_sweep" in record and b"sweep-test" in record  # W&B group = sweep name, tags from config
        assert list(wb.glob("files/media/table/eval/results_*.table.json"))
    table = pd.read_csv(sweep / "report.csv")
    assert list(table["status"]) == ["completed", "completed"]
    assert list(table["model.dropout.exp"]) == [0.0, 0.2] and table["eval/id_sim"].notna().all()
    assert (sweep / "plots" / "model.dropout.exp.png").is_file()
    assert "2 completed" in (sweep / "report.md").read_text()


def squeue_state(job: str) -> str:
    """The job's state as squeue prints it ('' once it has left the queue)."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def logged_steps(csv: Path) -> list[int]:
    """Steps with a training loss in one launch's CSV log (empty until the logger has flushed)."""
    if not csv.is_file():
        return []
    rows = pd.read_csv(csv)
    return [] if "train/loss" not in rows else rows.dropna(subset=["train/loss"])["step"].astype(int).tolist()


@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_resumes(slurm: str, toy_shards: Path, tiny_base,
                                                        tmp_path: Path) -> None:
    sweep, steps = tmp_path / "requeue", 20
    cmd = [sys.executable, "-m", "blendexp.train", "-m", *slurm_overrides(),
           *job_overrides(toy_shards, tiny_base, tmp_path), f"hydra.sweep.dir={sweep}", "seed=0",
           f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
           "logger=wandb"]
    log = tmp_path / "launcher.log"  # a file, not a pipe: submitit's polling would fill a pipe nobody reads yet
    with log.open("w") as out:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            run = sweep / "0"
            wait_for(lambda: 2 in logged_steps(run / "logs" / "version_0" / "metrics.csv"), 600, "the job's step 2")
            job = results(sweep)[0]["slurm_job_id"]
            # What SLURM sends `signal_delay_s` before the time limit: Lightning saves hpc_ckpt_1.ckpt and requeues.
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
            wait_for(lambda: squeue_state(job) == "PENDING", 120, "the job to be requeued")
            # SLURM holds a requeued job for about two minutes before it may start again; release it now.
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            launcher.wait(timeout=600)
        finally:
            launcher.kill()
    assert launcher.returncode == 0, log.read_text()[-4000:]
    saved = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved < steps
    resumed = logged_steps(run / "logs" / "version_1" / "metrics.csv")
    # only the remaining steps, not all of them again from step 0 (Lightning's logging step may differ from the
    # optimizer step by one when the signal landed between the optimizer step and the end of the batch)
    assert len(resumed) == steps - saved and min(resumed) >= saved - 1 >= 1
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == last["lr_schedulers"][0]["last_epoch"] == steps
    job_result = results(sweep)[0]
    assert job_result["status"] == "completed" and job_result["restarts"] == 1
    first, second = wandb_runs(run)
    assert first.name.split("-")[-1] == second.name.split("-")[-1] == run_id(str(run))  # the same W&B run, resumed
