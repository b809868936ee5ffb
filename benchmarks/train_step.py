"""Step time of the Expression Adapter LightningModule against a bare PyTorch loop doing the same work.

    python benchmarks/train_step.py [--steps 60] [--batch 8]

Both loops run the same tiny base, the same batch and the same AdamW update in one process; the printed ratio
is Lightning's time per step over the bare loop's (goal: <= 1.05).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from blendexp.modules.expression import ExpressionAdapterModule


class Repeat(IterableDataset):
    """The same batch forever, so data loading costs nothing in either loop."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def make_module(root: str) -> ExpressionAdapterModule:
    """A fresh module on the tiny base, with dropout off so both loops do identical work."""
    return ExpressionAdapterModule(
        base={"models": f"{root}/models", "sd15": f"{root}/stable-diffusion-v1-5", "tiny_root": root},
        adapter={"num_tokens": 4, "projection": "linear"}, noise={"prediction_type": "epsilon"},
        dropout={}, optim={"lr": 1e-4, "warmup_steps": 0})


def bare_loop(module: ExpressionAdapterModule, batch: dict, steps: int) -> float:
    """Seconds per step of forward, backward and AdamW step without Lightning."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()
    for i in range(steps + 5):
        if i == 5:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        module.forward_loss(batch).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


class StepTimer(L.Callback):
    """Times training batches after a warm-up, inside Lightning's own loop."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module) -> None:
        self.end = time.perf_counter()


def lightning_loop(module: ExpressionAdapterModule, batch: dict, steps: int) -> float:
    """Seconds per step of ``Trainer.fit`` on the same batch (logging on, checkpoints and bars off)."""
    timer = StepTimer(warmup=5)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps + 5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DataLoader(Repeat(batch), batch_size=None))
    return (timer.end - timer.start) / steps


def main() -> None:
    """Run both loops and print the ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop; the fastest counts")
    a = p.parse_args()
    torch.manual_seed(0)
    batch = {"pixel_values": torch.rand(a.batch, 3, 64, 64) * 2 - 1, "id": torch.randn(a.batch, 512),
             "exp": torch.randn(a.batch, 55), "skipped": torch.zeros(a.batch, dtype=torch.long)}
    bare, light = float("inf"), float("inf")
    with tempfile.TemporaryDirectory() as root:
        for _ in range(a.repeats):  # alternate so background load hits both loops alike
            bare = min(bare, bare_loop(make_module(root), batch, a.steps))
            light = min(light, lightning_loop(make_module(root), batch, a.steps))
    print(f"bare PyTorch: {bare * 1e3:.1f} ms/step   Lightning module: {light * 1e3:.1f} ms/step   "
          f"ratio: {light / bare:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
