"""Training entry point: ``python -m blendexp.train +experiment=expr_adapter [key=value ...]``.

Composes the config, instantiates DataModule, LightningModule, callbacks, loggers and Trainer, fits, optionally
evaluates the exported adapter (``evaluate_after=true``), records ``result.json`` and prints where the checkpoint,
exported adapter, sample grids and logs are. Sweeps: ``python -m blendexp.train -m ...`` (see experiments/).
"""

from __future__ import annotations

import logging
import pickle
import warnings
from typing import TYPE_CHECKING, Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.errors import run_entry

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group (entries without ``_target_`` are skipped)."""
    return [instantiate(c) for c in (group or {}).values() if isinstance(c, DictConfig) and "_target_" in c]


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer, list[Any], list[Any]]:
    """(datamodule, model, trainer, callbacks, loggers) of a run, seeded; benchmarks/train_step.py times this Trainer."""
    import lightning as L  # here, not at the top: --help and --cfg job compose without loading torch

    L.seed_everything(cfg.seed, workers=True)
    for key in ("data", "model", "trainer"):
        _config.check_types(cfg[key], key)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # fail on bad shard paths before loading any model
    model = instantiate(cfg.model)
    if cfg.get("evaluate_after"):
        from blendexp.eval.after_training import method_kind

        method_kind(model)  # a recipe the suite cannot score fails now, not after training
    project_gpu_memory(cfg, model)
    callbacks, loggers = instantiate_group(cfg.get("callbacks")), instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, model, trainer, callbacks, loggers


def project_gpu_memory(cfg: DictConfig, model: L.LightningModule) -> None:
    """On a GPU with the real-size base, print the memory model's projection for this batch before starting."""
    import torch

    from blendexp.memory_model import report
    from blendexp.models.full_size import PARAMETERS

    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator not in ("gpu", "cuda") and not (accelerator == "auto" and torch.cuda.is_available()):
        return
    if sum(p.numel() for p in model.unet.parameters()) < PARAMETERS["unet"]:
        return  # a toy or tiny base: the model was fitted at real size
    capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    report(cfg.task_name, int(cfg.data.image_size), bool(cfg.model.get("gradient_checkpointing")),
           int(cfg.data.batch_size), str(cfg.trainer.get("precision", "32")), cfg.get("memory_model"), capacity)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured recipe and return the final logged metrics (what a sweep optimises)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from blendexp.checkpoints import refused
    from blendexp.job import finish_runs, resume_path

    datamodule, model, trainer, callbacks, loggers = build(cfg)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    try:
        with warnings.catch_warnings():  # the frozen base stays in eval mode on purpose (no dropout in frozen parts)
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
            ckpt_path = resume_path(cfg.get("ckpt_path"), trainer)
            try:  # Lightning reads the checkpoint with torch.load; never let it unpickle code
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            except pickle.UnpicklingError:
                raise refused(trainer.ckpt_path or ckpt_path) from None
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


def _record_failure(err: BaseException) -> bool:
    """Record the failure in ``result.json``; in a sweep log it and go on with the other jobs (handled)."""
    from blendexp.job import in_sweep, write_result

    write_result("failed", error=err)
    if in_sweep():
        log.exception("job failed (recorded in result.json; the sweep goes on)")
        return True
    return False


def _train_and_record(cfg: DictConfig) -> float | None:
    """Train and record the completed run in ``result.json``; returns what a sweep optimises."""
    from blendexp.job import write_result

    metrics = train(cfg)
    write_result("completed", metrics)
    return metrics.get("train/loss")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry; records ``result.json``. User errors become one clear line and exit status 1 instead of a
    traceback; in a sweep a failed job is recorded and logged, and the other jobs go on."""
    from blendexp.job import write_result

    write_result("running")
    return run_entry(_train_and_record, cfg, on_error=_record_failure)


if __name__ == "__main__":
    main()
