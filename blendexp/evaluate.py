"""Evaluation entry point: ``python -m blendexp.evaluate [eval=<preset>] [key=value ...]``.

Generates (or reuses cached) fixed-seed samples of every configured method for every (source face, target
expression) pair, scores identity similarity, expression error, FID/KID and the no-face rate, and writes
``results.csv``, ``results.md``, ``expression_components.png`` and ``grids/`` into the run folder
(``outputs/evaluate/<run_name>``, by default the preset's name, so running the same command again resumes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.errors import run_entry


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Run the configured evaluation and return ``{"<method>/<metric>": mean}`` (what a sweep reads)."""
    import torch  # here, not at the top: --help and --cfg job compose without loading torch

    from blendexp.eval.report import log_to_loggers, write_report
    from blendexp.eval.suite import run_suite

    torch.manual_seed(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    array: dict[str, Any] = OmegaConf.to_container(cfg.array, resolve=True)  # type: ignore[assignment]
    out = Path(array["dir"] if array["size"] != 1 else cfg.out_dir)  # parts share one folder, also under -m
    out.mkdir(parents=True, exist_ok=True)
    eval_cfg: dict[str, Any] = OmegaConf.to_container(cfg.eval, resolve=True)  # type: ignore[assignment]
    result = run_suite(eval_cfg, out, device=cfg.device, seed=cfg.seed, array=array)
    if isinstance(result, dict):  # one part of an array evaluation
        print(f"blendexp: part {result['part']} of {result['size']} evaluated in {result['elapsed_s']:.0f} s "
              f"({result['methods']}); when every part is done, run the same command with array.index=merge")
        return {}
    files = write_report(result, out, int(eval_cfg.get("report", {}).get("grid_pairs", 8)))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if isinstance(c, DictConfig) and "_target_" in c]
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_to_loggers(loggers, files)
    for lg in loggers:
        lg.finalize("success")
        if hasattr(lg, "experiment") and hasattr(lg.experiment, "finish"):
            lg.experiment.finish()
    print(summary(result.test, files))
    return {f"{m}/{k}": est.mean for m, metrics in result.summary.items() for k, est in metrics.items()
            if not math.isnan(est.mean)}


def summary(test: Any, files: dict[str, Any]) -> str:
    """The results table and where every output is."""
    lines = [files["table"],
             f"blendexp: evaluated {len(test.sources)} sources x {len(test.targets)} targets "
             f"({len(test.skipped)} inputs skipped, see skipped.csv)",
             f"  table:  {files['markdown']}", f"  csv:    {files['csv']}", f"  plot:   {files['plot']}"]
    lines += [f"  grids:  {p}" for p in files["grids"][:3]]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry; user errors become one clear line and exit status 1 instead of a traceback."""
    run_entry(evaluate, cfg)


if __name__ == "__main__":
    main()
