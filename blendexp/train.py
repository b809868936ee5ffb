"""Training entry point: ``python -m blendexp.train +experiment=expr_adapter [key=value ...]``.

Composes the config, instantiates DataModule, LightningModule, callbacks, loggers and Trainer, fits, optionally
evaluates the exported adapter (``evaluate_after=true``), records ``result.json`` and prints where the checkpoint,
exported adapter, sample grids and logs are. Sweeps: ``python -m blendexp.train -m ...`` (see experiments/).
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.job import finish_runs, in_sweep, resume_path, write_result

log = logging.getLogger(__name__)
USER_ERRORS = (FileNotFoundError, ValueError, KeyError, FloatingPointError)
# The frozen base is kept in eval mode on purpose (no dropout in frozen parts); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group (entries without ``_target_`` are skipped)."""
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer, list[Any], list[Any]]:
    """(datamodule, model, trainer, callbacks, loggers) of a run, seeded; benchmarks/train_step.py times this Trainer."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # fail on bad shard paths before loading any model
    model = instantiate(cfg.model)
    if cfg.get("evaluate_after"):
        from blendexp.eval.after_training import method_kind

        method_kind(model)  # a recipe the suite cannot score fails now, not after training
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer, callbacks, loggers


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured recipe and return the final logged metrics (what a sweep optimises)."""
    datamodule, model, trainer, callbacks, loggers = build(cfg)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg.get("ckpt_path"), trainer))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("evaluate_after") and trainer.is_global_zero:
            from blendexp.eval.after_training import evaluate_run

            metrics.update(evaluate_run(cfg.evaluation, model, trainer, cfg.seed))
    except Exception as err:
        if trainer.received_sigterm:  # preempted or requeued: SLURM stopped W&B's service with us; not a failure
            raise SIGTERMException(f"stopped by SIGTERM ({type(err).__name__}: {err})") from err
        raise
    finally:
        finish_runs(loggers)
    if trainer.is_global_zero:
        print(summary(trainer, callbacks, metrics))
    return metrics


def summary(trainer: L.Trainer, callbacks: list[Any], metrics: dict[str, float]) -> str:
    """Human-readable list of what the run produced and where."""
    lines = [f"blendexp: finished at step {trainer.global_step}; "
             + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))]
    ckpt = trainer.checkpoint_callback
    if ckpt is not None and ckpt.last_model_path:
        lines.append(f"  checkpoint: {ckpt.last_model_path}")
    for cb in callbacks:
        for f in getattr(cb, "files", []):
            lines.append(f"  exported:   {f}")
        if getattr(cb, "paths", None):
            lines.append(f"  samples:    {cb.paths[-1]}")
    for lg in trainer.loggers:
        lines.append(f"  logs:       {lg.log_dir if getattr(lg, 'log_dir', None) else lg.save_dir}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; records ``result.json``. User errors become one clear line and exit status 1 instead of a
    traceback; in a sweep a failed job is recorded and logged, and the other jobs go on."""
    write_result("running")
    try:
        metrics = train(cfg)
    except Exception as err:
        write_result("failed", error=err)
        if in_sweep():
            log.exception("job failed (recorded in result.json; the sweep goes on)")
            return None
        if not isinstance(err, USER_ERRORS):
            raise
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    write_result("completed", metrics)
    return metrics.get("train/loss")


if __name__ == "__main__":
    main()
