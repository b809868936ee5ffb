"""Exact resume: a training process killed with SIGKILL after a checkpoint and resumed with ``ckpt_path=last``
exports the same tensors, bit for bit, as an uninterrupted run of the same seed (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_when, run_cli
from tests.test_train import shard_overrides

MAX_STEPS, EVERY = 9, 3
CASES = {  # recipe and data settings; every case shuffles (buffer 8 < 24 samples) and draws shards at random
    "expr_adapter": ("+experiment=expr_adapter",),
    "expr_adapter_2_workers": ("+experiment=expr_adapter", "data.num_workers=2"),
    "expr_adapter_ddp": ("+experiment=expr_adapter", "trainer=ddp"),  # two ranks (gloo), each with its stream
    "ref_adapter_pairs": ("+experiment=ref_adapter", "model.lora.rank=2", "model.lora.alpha=2"),
}


def train_args(case: str, shards: Path, tiny: tuple[Path, Path], out: Path, run: str) -> list[str]:
    """The user's command line for one case: tiny steps, a checkpoint every few steps, no sample grids."""
    return [*CASES[case], *shard_overrides(shards, tiny, out), f"data.sources.stills.shards={shards}/train-*.tar",
            f"run_name={run}", f"trainer.max_steps={MAX_STEPS}", "data.batch_size=4", "data.shuffle_buffer=8",
            f"callbacks.checkpoint.every_n_train_steps={EVERY}", "callbacks.samples.every_n_steps=0"]


def kill_after_first_checkpoint(args: list[str], ckpts: Path) -> int:
    """Start training, SIGKILL it as soon as a checkpoint and last.ckpt exist; the step last.ckpt holds."""
    kill_when("blendexp.train", args,
              lambda: (ckpts / f"epoch=0-step={EVERY}.ckpt").exists() and (ckpts / "last.ckpt").exists())
    return torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every exported safetensors file, named ``file/key``."""
    files = sorted((run_dir / "export").rglob("*.safetensors"))
    assert files, f"nothing exported in {run_dir}"
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(f).items()}


@pytest.mark.slow  # three tiny trainings per case: ~1 min each on 2 CPUs
@pytest.mark.parametrize("case", sorted(CASES))
def test_killed_run_resumes_bit_identical(case: str, toy_shards: Path, tiny_base, tmp_path: Path) -> None:
    full = run_cli("blendexp.train", *train_args(case, toy_shards, tiny_base, tmp_path, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    task = CASES[case][0].split("=")[1]
    killed_dir = tmp_path / task / "killed"
    step = kill_after_first_checkpoint(train_args(case, toy_shards, tiny_base, tmp_path, "killed"),
                                       killed_dir / "checkpoints")
    assert EVERY <= step < MAX_STEPS, f"killed at step {step}: too late to test resuming"
    assert json.loads((killed_dir / "result.json").read_text())["status"] == "running"

    resumed = run_cli("blendexp.train", *train_args(case, toy_shards, tiny_base, tmp_path, "killed"),
                      "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"finished at step {MAX_STEPS}" in resumed.stdout
    want, got = exported(tmp_path / task / "full"), exported(killed_dir)
    assert sorted(got) == sorted(want)
    diffs = {k: float((got[k].double() - want[k].double()).abs().max()) for k in want}
    (tmp_path / "max_abs_diff.json").write_text(json.dumps({"case": case, "killed_at_step": step, **diffs}, indent=1))
    assert all(d == 0.0 for d in diffs.values()), {k: d for k, d in diffs.items() if d}
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in got.values())

    result = json.loads((killed_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert [a["status"] for a in result["attempts"]] == ["interrupted"]
