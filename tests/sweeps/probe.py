"""A callback the DDP test adds through the config: what each rank trained on and the weights it ended with."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L


class RecordRank(L.Callback):
    """Write ``rank<N>.json`` with the sample keys of every training batch and a hash of the trained weights."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, idx: int) -> None:
        """Remember this rank's samples (keys are unique per face crop)."""
        self.keys += list(batch["key"])

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Hash the trained weights in a fixed order, so equal hashes mean bit-identical replicas."""
        digest = hashlib.sha1()
        for name, p in sorted(module.named_parameters()):
            if p.requires_grad:
                digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
        self.out.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world": trainer.world_size, "keys": self.keys,
                  "weights": digest.hexdigest(), "step": trainer.global_step, "pid": os.getpid(),
                  "cluster": type(trainer.strategy.cluster_environment).__name__,
                  "slurm_procid": os.environ.get("SLURM_PROCID"), "slurm_job": os.environ.get("SLURM_JOB_ID")}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
