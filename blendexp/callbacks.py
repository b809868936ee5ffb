"""Lightning callbacks shared by the recipes: fixed-seed sample grids, checkpoints by steps and time (written without
an in-memory copy), the random streams a resume needs, and adapter export at the end (image helpers without
Lightning: ``blendexp/images.py``)."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from blendexp.images import image_grid, to_uint8

log = logging.getLogger(__name__)


PREVIEW_POOL = 64  # evaluation samples scanned to find distinct subjects for the grid


class StreamingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer without its in-memory copy: it serialises the whole checkpoint into a buffer before
    writing (10 GB more RAM for a full base with its AdamW state: out of memory on a 24 GB machine). Local files
    stream to a temporary file beside the target, renamed into place (as atomic); URLs go to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically: a save killed half-way leaves the previous file intact."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            torch.save(checkpoint, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def preview_order(subjects: list[str], n_ids: int, n_exps: int) -> list[int]:
    """Indices of ``n_ids`` samples of distinct subjects, then ``n_exps`` expression donors of other subjects.

    Shards are grouped by subject, so the first few samples would otherwise all show the same person.
    """
    firsts = list(dict.fromkeys(subjects))
    ids = [subjects.index(s) for s in firsts[:n_ids]]
    donors = [i for i, s in enumerate(subjects) if s not in firsts[:n_ids]]
    donors = donors[:: max(1, len(donors) // max(n_exps, 1))][:n_exps] if donors else []
    rest = [i for i in range(len(subjects)) if i not in ids and i not in donors]
    return ids + donors + rest[: max(0, n_exps - len(donors))]


class SampleGrid(L.Callback):
    """Every N steps: identities (rows) × target expressions (columns) from the evaluation shards, fixed seeds.

    Row 0 shows the frames the target expressions were taken from; column 0 the identity's own image, which is
    also the reference image for recipes that generate from one (``module.uses_reference``).
    Written to ``<run>/samples/step_XXXXXX.png`` and to loggers that take images (W&B).
    """

    def __init__(self, every_n_steps: int = 100, n_identities: int = 3, n_expressions: int = 4,
                 steps: int = 20, guidance: float = 3.0, seed: int = 0) -> None:
        self.every_n_steps, self.n_ids, self.n_exps = every_n_steps, n_identities, n_expressions
        self.steps, self.guidance, self.seed = steps, guidance, seed
        self._preview: dict[str, Any] | None = None
        self._n_found = 0
        self.paths: list[Path] = []

    def _conditions(self, trainer: L.Trainer) -> dict[str, Any]:
        """Fixed preview batch from the DataModule (read once): identities first, then expression donors."""
        if self._preview is None:
            batch = trainer.datamodule.preview(PREVIEW_POOL)
            subjects = [str(k).split("/")[1] for k in batch["key"]]
            order = preview_order(subjects, self.n_ids, self.n_exps)
            self._n_found = min(self.n_ids, len(set(subjects)), len(order) - 1)
            self._preview = {k: ([v[i] for i in order] if isinstance(v, list) else v[order]) for k, v in batch.items()}
        return self._preview

    @rank_zero_only
    def render(self, trainer: L.Trainer, module: L.LightningModule) -> Path:
        """Generate the grid now and write it."""
        prev = self._conditions(trainer)
        n_ids = self._n_found
        ids, exps = prev["id"][:n_ids], prev["exp"][n_ids:n_ids + self.n_exps]
        id_rows = ids.repeat_interleave(len(exps), 0)
        exp_rows = exps.repeat(n_ids, 1)
        seeds = [self.seed + i for i in range(len(id_rows))]
        extra = {}
        if getattr(module, "uses_reference", False):
            extra["reference"] = prev["pixel_values"][:n_ids].repeat_interleave(len(exps), 0)
        images = module.sample_images(id_rows, exp_rows, seeds=seeds, steps=self.steps, guidance=self.guidance,
                                      size=prev["pixel_values"].shape[-1], **extra)
        src = to_uint8(prev["pixel_values"])
        rows: list[list[np.ndarray | None]] = [[None] + list(src[n_ids:n_ids + len(exps)])]
        for i in range(n_ids):
            rows.append([src[i]] + list(images[i * len(exps):(i + 1) * len(exps)]))
        out = Path(trainer.default_root_dir) / "samples" / f"step_{trainer.global_step:06d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(rows)
        grid.save(out)
        self.paths.append(out)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=trainer.global_step)
        return out

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """Render on schedule (not at step 0, not twice for the same step)."""
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step > 0:
            self.render(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A final grid unless the last step already produced one."""
        if not self.paths or not self.paths[-1].name.endswith(f"{trainer.global_step:06d}.png"):
            self.render(trainer, module)


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` saving every ``every_n_train_steps`` steps *and* every ``every_minutes`` minutes since the
    newest checkpoint (Lightning takes only one of the two), with ``last.ckpt`` always the newest, also when
    training stops between save intervals.

    Endless (resampled) data never ends an epoch, so without the final save the last steps of a run would be lost to
    ``ckpt_path=last``.
    """

    def __init__(self, every_minutes: float | None = None, **kwargs: Any) -> None:
        """``every_minutes``: None or 0 saves by steps only; the rest is ``ModelCheckpoint``'s."""
        super().__init__(**kwargs)
        if every_minutes is not None and not every_minutes >= 0:
            raise ValueError(f"callbacks.checkpoint.every_minutes must be >= 0 or null, got {every_minutes}")
        self.every_minutes = every_minutes
        self._saved_at = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Start the clock with training (model loading and a resume's replay do not count)."""
        super().on_train_start(trainer, module)
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """Save on the step schedule, else when the newest checkpoint is ``every_minutes`` old (rank 0's clock)."""
        super().on_train_batch_end(trainer, module, *args)
        if self._last_global_step_saved == trainer.global_step:
            self._saved_at = time.monotonic()
            return
        if not self.every_minutes:
            return
        due = time.monotonic() - self._saved_at >= 60 * self.every_minutes
        if trainer.strategy.broadcast(due) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            self._saved_at = time.monotonic()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Save ``last.ckpt`` at the final step unless it is already current."""
        super().on_train_end(trainer, module)
        if self.save_last and self.dirpath and self._last_global_step_saved != trainer.global_step:
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path)
            self.last_model_path = str(path)


class ExportAdapter(L.Callback):
    """At the end of training, write what was trained in the format diffusers' loaders read."""

    def __init__(self, dirname: str = "export") -> None:
        self.dirname = dirname
        self.files: list[Path] = []

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Export to ``<run>/<dirname>``."""
        self.files = module.export(Path(trainer.default_root_dir) / self.dirname)
        log.info("exported %s", ", ".join(map(str, self.files)))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """A resume from a checkpoint already at ``max_steps`` skips Lightning's loop and ``on_train_end``: export the
        restored weights anyway, so the run folder holds its adapter (and say that nothing was trained)."""
        if not self.files:
            log.warning("the checkpoint is already at step %d (trainer.max_steps=%s): nothing trained; exporting its "
                        "weights. Raise trainer.max_steps to train on.", trainer.global_step, trainer.max_steps)
            self.on_train_end(trainer, module)


class RandomStates(L.Callback):
    """Keeps every global random stream (torch CPU and CUDA, NumPy, Python) of every rank in the checkpoint and puts
    it back just before the first resumed batch. Lightning restores none of them, so condition dropout, noise,
    timesteps and VAE sampling would otherwise draw differently from an uninterrupted run."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        """This moment's states, one entry per rank (gathered: every rank writes the checkpoint's dump)."""
        states = capture_random_states()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return {"ranks": [states]}
        ranks: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, states)
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Held until training starts: building the data loaders draws from torch's generator on every start."""
        self._pending = state_dict["ranks"]

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        """Restore this rank's states once, right before its first resumed step."""
        if self._pending is None:
            return
        ranks, self._pending = self._pending, None
        if len(ranks) != trainer.world_size:
            log.warning("checkpoint holds random states of %d ranks, this run has %d: random draws continue afresh "
                        "and will not equal an uninterrupted run", len(ranks), trainer.world_size)
            return
        restore_random_states(ranks[trainer.global_rank])


def capture_random_states() -> dict[str, Any]:
    """Global random states as tensors and plain numbers (``torch.load(weights_only=True)`` reads them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                        "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict[str, Any]) -> None:
    """Inverse of ``capture_random_states``."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
