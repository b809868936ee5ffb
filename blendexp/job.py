"""What one training job leaves behind and how it comes back: ``result.json`` (status, metrics, overrides, error,
earlier attempts; see ``blendexp/results.py``) that the sweep report reads, resuming a requeued SLURM job where it
stopped, and closing W&B runs so the next job of an in-process sweep starts its own run.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only

from blendexp.results import RESULT_FILE, record_attempt

log = logging.getLogger(__name__)


def in_sweep() -> bool:
    """True inside a Hydra multirun job, where one failure must not stop the other jobs."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def restarts() -> int:
    """How often SLURM has requeued this job (0 outside SLURM and on the first start)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def job_info() -> dict[str, Any]:
    """Who this job is: run folder, Hydra overrides and job number, SLURM job id and restarts."""
    hc = HydraConfig.get()
    slurm = os.environ.get("SLURM_ARRAY_JOB_ID")
    slurm_id = f"{slurm}_{os.environ['SLURM_ARRAY_TASK_ID']}" if slurm else os.environ.get("SLURM_JOB_ID")
    return {"run_dir": hc.runtime.output_dir, "overrides": list(hc.overrides.task),
            "job_num": hc.job.num if in_sweep() else None, "slurm_job_id": slurm_id, "restarts": restarts()}


@rank_zero_only
def write_result(status: str, metrics: dict[str, float] | None = None, error: BaseException | None = None) -> Path:
    """Record the job's state in ``<run>/result.json`` (earlier, e.g. interrupted, attempts of the run kept)."""
    info = job_info()
    path = Path(info["run_dir"]) / RESULT_FILE
    finite = {k: v if math.isfinite(v) else None for k, v in (metrics or {}).items()}  # NaN is not JSON: null
    record_attempt(path, {"status": status, "metrics": finite, **info,
                          "error": None if error is None else f"{type(error).__name__}: {error}"})
    return path


def resume_path(ckpt_path: str | None, trainer: L.Trainer) -> str | None:
    """``ckpt_path`` as configured; a requeued SLURM job without one continues where it stopped: from Lightning's
    ``hpc_ckpt_N.ckpt`` (saved on the requeue signal; Lightning picks it itself when given None), else ``last``."""
    if ckpt_path is not None or restarts() == 0:
        return ckpt_path
    return None if any(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")) else "last"


def finish_runs(loggers: list[Any]) -> None:
    """Close started W&B runs: W&B would otherwise hand the next in-process sweep job this job's run. Never raises:
    on preemption SLURM has also stopped W&B's service, and the job's own outcome must not be masked."""
    for lg in loggers:
        run = getattr(lg, "_experiment", None)
        if run is not None and hasattr(run, "finish"):
            try:
                run.finish()
            except Exception as err:  # noqa: BLE001 - e.g. ConnectionResetError from a service killed with the job
                log.warning("could not close the W&B run (%s: %s); its offline files stay in place",
                            type(err).__name__, err)
