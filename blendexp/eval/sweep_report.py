"""The report of a sweep: one row per job (its swept values, status, metrics, error) as CSV and Markdown, and a plot
of every metric against every swept value. It reads the ``result.json`` each job writes (``blendexp/job.py``), so
it works on a finished, a running or a partly failed sweep, local or on SLURM.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import pandas as pd  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from blendexp.results import RESULT_FILE, read_result  # noqa: E402

FIXED_COLUMNS = ("job", "status")


def load_results(sweep: Path) -> list[dict[str, Any]]:
    """Every job's ``result.json`` under ``sweep``, in job order; a folder without any is an error naming it."""
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep folder {sweep} does not exist; give the folder a multirun printed "
                                f"(e.g. outputs/<task>/multirun/<time>)")
    results = []
    for path in sweep.glob(f"**/{RESULT_FILE}"):
        # the job is named by its folder below `sweep`: "3", or "mlp/3" for a study made of several sweeps
        results.append({**read_result(path), "job": path.parent.relative_to(sweep).as_posix()})
    if not results:
        raise FileNotFoundError(f"no {RESULT_FILE} under {sweep}: no job of this sweep has started yet, or it is "
                                f"not a blendexp sweep folder")
    return sorted(results, key=lambda r: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in r["job"].split("/")])


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``key=value`` overrides as a dict (``+``/``++`` prefixes dropped, ``~key`` deletions kept as ``<deleted>``)."""
    out = {}
    for item in overrides:
        if item.startswith("~"):
            out[item[1:].split("=", 1)[0]] = "<deleted>"
            continue
        key, _, value = item.lstrip("+").partition("=")
        out[key] = value
    return out


def sweep_frame(results: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[str], list[str]]:
    """(table, swept keys, metric names): swept keys are overrides whose value differs between jobs."""
    overrides = [parse_overrides(r.get("overrides", [])) for r in results]
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    swept = [k for k in keys if len({o.get(k) for o in overrides}) > 1]
    metrics = sorted({m for r in results for m in r.get("metrics", {})}, key=lambda m: (not m.startswith("train/"), m))
    rows = []
    for r, o in zip(results, overrides):
        row: dict[str, Any] = {"job": r["job"], "status": r["status"], **{k: o.get(k) for k in swept}}
        row.update({m: r.get("metrics", {}).get(m) for m in metrics})
        row.update({"error": r.get("error"), "restarts": r.get("restarts", 0), "run_dir": r.get("run_dir")})
        rows.append(row)
    return pd.DataFrame(rows, columns=[*FIXED_COLUMNS, *swept, *metrics, "error", "restarts", "run_dir"]), swept, metrics


def _fmt(value: Any) -> str:
    """A table cell: numbers to 4 significant digits, no value as a dash, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame, swept: list[str], metrics: list[str], max_error: int = 200) -> str:
    """The jobs × (swept values, metrics) table; a failed job shows **failed** and its error."""
    columns = [*FIXED_COLUMNS, *swept, *metrics, "error"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.to_dict("records"):
        cells = [_fmt(row[c]) for c in columns]
        cells[1] = f"**{row['status']}**" if row["status"] != "completed" else row["status"]
        if isinstance(row["error"], str):
            cells[-1] = _fmt(row["error"][:max_error])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _positions(values: pd.Series) -> tuple[list[float], list[float], list[str]] | None:
    """x positions of swept values: numeric when they all parse as numbers, else categories in sweep order."""
    try:
        x = [float(v) for v in values]
        return x, sorted(set(x)), [f"{v:g}" for v in sorted(set(x))]
    except (TypeError, ValueError):
        labels = list(dict.fromkeys(str(v) for v in values))
        return [float(labels.index(str(v))) for v in values], [float(i) for i in range(len(labels))], labels


def plot_key(table: pd.DataFrame, key: str, metrics: list[str], path: Path) -> Path:
    """One panel per metric against the swept ``key``: every completed job as a point, the mean per value as a line."""
    done = table[table["status"] == "completed"]
    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(max(1, len(metrics)) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    x, ticks, labels = _positions(done[key].fillna("<unset>")) if len(done) else ([], [], [])
    for ax, metric in zip(axes.flat, metrics):
        y = pd.to_numeric(done[metric], errors="coerce").to_numpy()
        ax.scatter(x, y, s=18, alpha=0.7)
        means = pd.Series(y).groupby(x).mean() if len(x) else pd.Series(dtype=float)
        ax.plot(means.index, means.to_numpy(), linewidth=1)
        ax.set_xticks(ticks, labels, rotation=30 if max(map(len, labels), default=0) > 6 else 0, fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel(key, fontsize=8)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    failed = int((table["status"] != "completed").sum())
    fig.suptitle(f"{key} ({len(done)} completed" + (f", {failed} not completed" if failed else "") + ")", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweep_report(sweep: Path, out: Path | None = None) -> dict[str, Any]:
    """Write ``report.csv``, ``report.md`` and ``plots/<key>.png`` into ``out`` (default: the sweep folder)."""
    out = Path(out or sweep)
    results = load_results(Path(sweep))
    table, swept, metrics = sweep_frame(results)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "report.csv", index=False)
    text = markdown_table(table, swept, metrics)
    counts = table["status"].value_counts().to_dict()
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    (out / "report.md").write_text(f"# Sweep {Path(sweep).name}\n\n{len(table)} jobs: {summary}. Swept: "
                                   f"{', '.join(f'`{k}`' for k in swept) or 'nothing'}.\n\n{text}\n")
    plots = []
    if swept and metrics:
        (out / "plots").mkdir(exist_ok=True)
        plots = [plot_key(table, k, metrics, out / "plots" / f"{k.replace('/', '_')}.png") for k in swept]
    return {"csv": out / "report.csv", "markdown": out / "report.md", "plots": plots, "table": text,
            "summary": summary, "unfinished": table[table["status"] != "completed"]}


class SweepReport(Callback):
    """Hydra callback: write shared caches once before a sweep's parallel jobs would race to write them, and the
    sweep report when every job is done (exit status 1 when a job failed)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the tiny base and tiny annotators of the embedded default before any job needs them."""
        tiny_base = OmegaConf.select(config, "model.base.tiny_root")
        if tiny_base:
            from blendexp.models.tiny import ensure_tiny_base

            ensure_tiny_base(tiny_base)
        annotators = OmegaConf.select(config, "evaluation.annotators.tiny_root")
        if OmegaConf.select(config, "evaluate_after") and annotators:
            from blendexp.faces.annotators import ensure_tiny_annotators

            ensure_tiny_annotators(annotators)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Report all jobs; name those that did not complete and exit with status 1 if there are any."""
        files = write_sweep_report(Path(config.hydra.sweep.dir))
        print(f"{files['table']}\nblendexp: sweep done ({files['summary']})\n  report: {files['markdown']}\n"
              f"  csv:    {files['csv']}" + "".join(f"\n  plot:   {p}" for p in files["plots"]))
        bad = files["unfinished"]
        if len(bad):
            print(f"error: {len(bad)} job(s) did not complete ({', '.join(map(str, bad['job']))}); their errors are "
                  f"in {files['markdown']}", file=sys.stderr)
            sys.exit(1)
