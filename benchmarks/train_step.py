"""Training step time of ``python -m blendexp.train +experiment=expr_adapter`` against a bare PyTorch loop.

    python benchmarks/train_step.py [--steps 60] [--warmup 5] [--repeats 3] [--check] [--quick] [override ...]

The Trainer side is what the entry point builds (``blendexp.train.build`` on the composed ``train`` config: the
shipped toy base, the sample shards through the DataModule's training stream, CSV logger, checkpointing, learning-
rate monitor, sample grids, export, progress bar, gradient clipping and grad-norm logging); only output paths are
redirected to a temporary folder. The bare loop does the same work and nothing more: batches from the same
DataModule, the module's ``forward_loss``, backward, gradient clipping, AdamW and the learning-rate schedule.
Both are timed from the start of step ``--warmup`` to the end of the last step: logging (every 10 steps) counts, and
checkpoints saved inside that window count (the first comes at step 100: ``--steps 100`` includes it); the final
sample grid and export after the last step do not.
Figure: Trainer time per step / bare loop's (goal in goals.py). Extra ``key=value`` arguments are Hydra overrides.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from typing import Any

import lightning as L
import torch
from diffusers.optimization import get_scheduler
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from blendexp.config import CONF_DIR
from blendexp.train import build
from goals import Round, alternating, check_args, standalone

NAME = "train_step"
QUICK = ["--steps", "8", "--warmup", "2", "model.base.tiny_root=${paths.tiny_base}", "data.batch_size=2",
         "callbacks.samples.n_identities=1", "callbacks.samples.n_expressions=1", "callbacks.samples.steps=1"]


class StepTimer(L.Callback):
    """Times training batches from ``warmup`` to the last one, inside Lightning's own loop."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.end = time.perf_counter()


def config(args: argparse.Namespace, out: str) -> DictConfig:
    """The composed training config a user gets, with outputs in ``out`` and ``warmup + steps`` steps."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[
            "+experiment=expr_adapter", f"trainer.max_steps={args.warmup + args.steps}",
            f"trainer.default_root_dir={out}", f"callbacks.checkpoint.dirpath={out}/checkpoints",
            f"logger.csv.save_dir={out}", *args.overrides])


def trainer_loop(cfg: DictConfig, warmup: int) -> float:
    """Seconds per step of ``Trainer.fit`` exactly as the entry point builds it."""
    datamodule, model, trainer, _, _ = build(cfg)
    timer = StepTimer(warmup)
    trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=datamodule)
    return (timer.end - timer.start) / (cfg.trainer.max_steps - warmup)


def bare_loop(cfg: DictConfig, warmup: int) -> float:
    """Seconds per step of the same data, loss, clipping and optimiser work in plain PyTorch."""
    L.seed_everything(cfg.seed)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    o = cfg.model.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    sched = get_scheduler(o.schedule, opt, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.trainer.max_steps)
    model.train()
    batches = iter(datamodule.train_dataloader())
    for i in range(cfg.trainer.max_steps):
        if i == warmup:
            start = time.perf_counter()
        loss = model.forward_loss(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.gradient_clip_val)
        opt.step()
        sched.step()
    return (time.perf_counter() - start) / (cfg.trainer.max_steps - warmup)


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = check_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--steps", type=int, default=60, help="timed steps per run (100 or more: the first checkpoint too)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the train config, e.g. data.batch_size=16")
    return p


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> Any:
    """One round: a bare run, then a Trainer run (fresh model, data and optimiser each)."""
    cfg = config(args, stack.enter_context(tempfile.TemporaryDirectory()))

    return alternating({"bare": lambda: bare_loop(cfg, args.warmup), "trainer": lambda: trainer_loop(cfg, args.warmup)})


def figure(rounds: list[Round]) -> tuple[float, str]:
    """Fastest Trainer step over fastest bare step."""
    bare, trainer = min(r["bare"] for r in rounds), min(r["trainer"] for r in rounds)
    return trainer / bare, f"bare PyTorch {bare * 1e3:.1f} ms/step, Trainer {trainer * 1e3:.1f} ms/step"


if __name__ == "__main__":
    standalone(__import__(__name__))
