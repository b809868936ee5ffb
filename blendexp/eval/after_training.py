"""Train, then evaluate (``evaluate_after=true``): the evaluation suite scores the adapter a run has just exported,
writes its report to ``<run>/eval/`` and sends the tables to the run's own loggers, so a sweep's jobs each end with
comparable numbers. Only the trained method is generated: the baselines are the same for every job of a sweep.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from blendexp.eval.report import log_to_loggers, write_report
from blendexp.eval.suite import run_suite
from blendexp.modules.expression import ExpressionAdapterModule
from blendexp.modules.reference import ReferenceAdapterModule

log = logging.getLogger(__name__)


def method_kind(module: L.LightningModule) -> str:
    """The evaluation method that generates with what ``module`` trains; other recipes cannot be scored this way."""
    if isinstance(module, ReferenceAdapterModule):
        return "expr_ref"
    if isinstance(module, ExpressionAdapterModule):
        return "expr_adapter"
    raise ValueError(f"evaluate_after=true: {type(module).__name__} exports no adapter the evaluation suite "
                     f"generates with; it supports the expr_adapter and ref_adapter recipes (set evaluate_after=false)")


def trained_method(evaluation: DictConfig, module: L.LightningModule, run_dir: Path) -> dict[str, Any]:
    """This run's entry for ``evaluation.methods``: the preset's options for its kind, pointed at ``run_dir``."""
    kind = method_kind(module)
    method: dict[str, Any] = {**OmegaConf.to_container(evaluation.methods.get(kind, {}), resolve=True), "kind": kind}
    if kind == "expr_adapter":
        method["adapter"] = str(run_dir)
    else:
        method["ref_adapter"] = str(run_dir)
        if not module.train_expression:  # the Expression Adapter was given, not trained (so not in the export)
            method["exp_adapter"] = module.hparams.get("expression_adapter")
    return method


def evaluate_run(evaluation: DictConfig, module: L.LightningModule, trainer: L.Trainer, seed: int
                 ) -> dict[str, float]:
    """Score the run's export with the configured suite; return its means as ``eval/<metric>``."""
    run_dir = Path(trainer.default_root_dir)
    cfg: dict[str, Any] = OmegaConf.to_container(evaluation, resolve=True)  # type: ignore[assignment]
    method = trained_method(evaluation, module, run_dir)
    cfg["methods"] = {method["kind"]: method}
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result = run_suite(cfg, out, device=trainer.strategy.root_device.type, seed=seed)
    files = write_report(result, out, int(cfg.get("report", {}).get("grid_pairs", 8)))
    log_to_loggers(trainer.loggers, files)
    log.info("evaluation of %s written to %s", run_dir, files["markdown"])
    return {f"eval/{k}": est.mean for k, est in result.summary[method["kind"]].items() if not math.isnan(est.mean)}
