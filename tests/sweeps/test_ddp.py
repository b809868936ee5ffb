"""``trainer=ddp`` on CPU: two processes (gloo) that split the data and stay identical replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.sweeps.conftest import job_overrides, train_cli


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
