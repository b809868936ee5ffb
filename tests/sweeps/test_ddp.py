"""``trainer=ddp`` on CPU: two processes (gloo) that split the data and stay identical replicas, started by Lightning
or, as on a multi-node cluster, by srun with the ranks taken from SLURM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sweeps.conftest import job_overrides, results, slurm_overrides, train_cli


@pytest.fixture(scope="module")
def ranks(toy_shards: Path, tiny_base, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the two ranks of one 3-step DDP run trained on and ended with (tests/sweeps/probe.py)."""
    out = tmp_path_factory.mktemp("ddp")
    res = train_cli(*job_overrides(toy_shards, tiny_base, out), "trainer=ddp", "trainer.max_steps=3", "run_name=ddp",
                    f"data.sources.stills.shards=[{toy_shards}/train-000000.tar,{toy_shards}/train-000001.tar]",
                    "+callbacks.probe._target_=tests.sweeps.probe.RecordRank", f"+callbacks.probe.out={out}/probe")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "finished at step 3" in res.stdout
    return [json.loads((out / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_end_with_equal_weights(ranks: list[dict]) -> None:
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 3 * 4
    assert ranks[0]["keys"] != ranks[1]["keys"]  # not two copies of one stream
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were all-reduced every step


@pytest.mark.slow
def test_two_processes_train_on_disjoint_samples(ranks: list[dict]) -> None:
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])


@pytest.mark.slow  # one SLURM job of two ranks: ~30 s, mostly imports
def test_ddp_under_srun_takes_its_ranks_from_slurm(slurm: str, toy_shards: Path, tiny_base,
                                                   tmp_path: Path) -> None:
    sweep, probe = tmp_path / "sweep", tmp_path / "probe"
    res = train_cli("-m", *slurm_overrides(), *job_overrides(toy_shards, tiny_base, tmp_path), "trainer=ddp",
                    "hydra.launcher.tasks_per_node=2", "trainer.max_steps=3", f"hydra.sweep.dir={sweep}",
                    f"data.sources.stills.shards=[{toy_shards}/train-000000.tar,{toy_shards}/train-000001.tar]",
                    "+callbacks.probe._target_=tests.sweeps.probe.RecordRank", f"+callbacks.probe.out={probe}")
    assert res.returncode == 0, res.stderr[-4000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    job = results(sweep)[0]
    assert job["status"] == "completed" and job["slurm_job_id"]
    # Both ranks are tasks of that SLURM job started by srun (not processes Lightning spawned), ranked by SLURM.
    assert [(r["cluster"], r["slurm_job"], r["slurm_procid"]) for r in ranks] == [
        ("SLURMEnvironment", job["slurm_job_id"], "0"), ("SLURMEnvironment", job["slurm_job_id"], "1")]
    assert [r["world"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"]) and ranks[0]["weights"] == ranks[1]["weights"]
