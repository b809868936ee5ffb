"""The report of one evaluation: CSV and Markdown tables (methods × metrics), the per-component expression-error
plot, image grids (source | target expression | each method) and, when a W&B logger is on, the same as W&B tables
and images. (Reports across several evaluations, e.g. a sweep, are another module's job.)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from blendexp.eval.metrics import METRICS, Estimate  # noqa: E402
from blendexp.eval.suite import SuiteResult  # noqa: E402
from blendexp.flame import COMPONENT_NAMES, N_EXPRESSION, N_EYELID  # noqa: E402
from blendexp.images import image_grid, load_image  # noqa: E402

log = logging.getLogger(__name__)

LABEL_HEIGHT = 14


def summary_frame(result: SuiteResult) -> pd.DataFrame:
    """Methods × metrics with ``<metric>``, ``<metric>_low``, ``<metric>_high`` (95% interval) columns."""
    rows = []
    for method, metrics in result.summary.items():
        row: dict[str, Any] = {"method": method, **result.counts[method]}
        for key, est in metrics.items():
            row.update({key: est.mean, f"{key}_low": est.low, f"{key}_high": est.high})
        rows.append(row)
    return pd.DataFrame(rows)


def _digits(value: float) -> int:
    """Decimals shown for a value: more for small metrics (KID, rates) so differences stay visible."""
    return 4 if abs(value) < 0.1 else 3


def _cell(est: Estimate, best: bool) -> str:
    """``mean ± half-width`` (t interval) or ``mean [low, high]`` (bootstrap); the best method in bold."""
    if math.isnan(est.mean):
        return "–"
    d = _digits(est.mean)
    text = f"{est.mean:.{d}f}"
    if not math.isnan(est.low):
        text += f" ± {(est.high - est.low) / 2:.{d}f}" if est.symmetric else f" [{est.low:.{d}f}, {est.high:.{d}f}]"
    return f"**{text}**" if best else text


def _best(means: list[float], higher_is_better: bool) -> float | None:
    """The best value as displayed, or None on a tie (bold would then mislead)."""
    shown = [round(m, _digits(m)) for m in means if not math.isnan(m)]
    top = max(shown, default=None) if higher_is_better else min(shown, default=None)
    return top if top is not None and shown.count(top) == 1 and len(shown) > 1 else None


def markdown_table(result: SuiteResult) -> str:
    """The methods × metrics table; arrows say which direction is better, bold marks the best method."""
    keys = [k for k in METRICS if any(k in m for m in result.summary.values())]
    header = ["method", "images"] + [f"{METRICS[k].label} {'↑' if METRICS[k].higher_is_better else '↓'}" for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    best = {k: _best([m[k].mean for m in result.summary.values() if k in m], METRICS[k].higher_is_better)
            for k in keys}
    for method, metrics in result.summary.items():
        c = result.counts[method]
        images = f"{c['images']}" + (f" ({c['missing']} missing)" if c["missing"] else "")
        cells = [_cell(metrics[k], best[k] is not None and round(metrics[k].mean, _digits(metrics[k].mean)) == best[k])
                 if k in metrics else "–" for k in keys]
        lines.append("| " + " | ".join([method, images] + cells) + " |")
    return "\n".join(lines)


def component_errors(result: SuiteResult) -> pd.DataFrame:
    """Mean absolute error of each of the 55 FLAME components (rows) per method (columns)."""
    return pd.DataFrame({m: np.abs(r[:, 1] - r[:, 0]).mean(axis=0) if len(r) else np.full(len(COMPONENT_NAMES), np.nan)
                         for m, r in result.expression.items()}, index=list(COMPONENT_NAMES))


def expression_per_image(result: SuiteResult) -> pd.DataFrame:
    """Each image with a face: its method, source, target, sample, and the 55 target and read FLAME values
    (``target.<component>``, ``read.<component>``): what per-component correlations and resampled intervals need."""
    keys, values = ["method", "source", "target", "sample"], [f"{kind}.{c}" for kind in ("target", "read")
                                                              for c in COMPONENT_NAMES]
    frames = []
    for method, readings in result.expression.items():
        if len(readings):
            rows = result.per_image[(result.per_image["method"] == method) & result.per_image["face"]]
            frames.append(pd.concat([rows[keys].reset_index(drop=True),
                                     pd.DataFrame(readings.reshape(len(readings), -1), columns=values)], axis=1))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=keys + values)


def component_plot(components: pd.DataFrame, path: Path) -> Path:
    """Per-component expression error per method, expression / eyelid / jaw parts separated."""
    fig, ax = plt.subplots(figsize=(12, 4))
    x = np.arange(len(components))
    for method in components.columns:
        ax.plot(x, components[method].to_numpy(), marker="o", markersize=3, linewidth=1, label=method)
    for edge in (N_EXPRESSION - 0.5, N_EXPRESSION + N_EYELID - 0.5):
        ax.axvline(edge, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, list(components.index), rotation=90, fontsize=6)
    ax.set_xlim(-1, len(components))
    ax.set_ylabel("mean |SMIRK(generated) - target|")
    ax.set_title("Expression error per FLAME component")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _labelled(grid: Image.Image, labels: list[str], cell: int, pad: int = 2) -> Image.Image:
    """Add a header strip naming each column."""
    out = Image.new("RGB", (grid.width, grid.height + LABEL_HEIGHT), "white")
    out.paste(grid, (0, LABEL_HEIGHT))
    draw = ImageDraw.Draw(out)
    for j, label in enumerate(labels):
        draw.text((pad + j * (cell + pad), 1), label[: max(cell // 6, 3)], fill="black")
    return out


def image_grids(result: SuiteResult, folder: Path, pairs: int, per_grid: int = 8, seed: int = 0) -> list[Path]:
    """Grids of ``pairs`` (source, target) pairs drawn at random (seeded, so spread over the whole test set),
    sample 0 of each: source | target | one column per method."""
    frame = result.per_image[result.per_image["sample"] == 0]
    if frame.empty:
        return []
    methods = list(result.summary)
    lookup = {(r.method, r.source, r.target): r.path for r in frame.itertuples()}
    test = result.test
    every = [(s, t) for s in test.sources for t in test.targets]
    todo = [every[i] for i in sorted(np.random.default_rng(seed).permutation(len(every))[:pairs])]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for g, start in enumerate(range(0, len(todo), per_grid)):
        rows = []
        for s, t in todo[start:start + per_grid]:
            cells = [load_image(lookup[(m, s.name, t.name)]) if (m, s.name, t.name) in lookup else None for m in methods]
            rows.append([s.aligned, t.image] + cells)
        size = next((c.shape[0] for r in rows for c in r[2:] if c is not None), rows[0][0].shape[0])  # generated
        rows = [[None if c is None else _resize(c, size) for c in r] for r in rows]  # cells of any size line up
        grid = _labelled(image_grid(rows), ["source", "target"] + methods, size)
        paths.append(folder / f"grid_{g:03d}.png")
        grid.save(paths[-1])
    return paths


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square-resize an image (an input, or a baseline's of another size) to the grid's cell size."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def write_report(result: SuiteResult, out: Path, grid_pairs: int = 8) -> dict[str, Any]:
    """Write every report file into ``out`` and return their paths by kind."""
    summary = summary_frame(result)
    summary.to_csv(out / "results.csv", index=False)
    result.per_image.to_csv(out / "per_image.csv", index=False)
    components = component_errors(result)
    components.to_csv(out / "expression_components.csv", index_label="component")
    expression_per_image(result).to_csv(out / "expression_per_image.csv", index=False, float_format="%.6g")
    skipped = pd.DataFrame([vars(s) for s in result.test.skipped], columns=["role", "origin", "reason"])
    skipped.to_csv(out / "skipped.csv", index=False)
    table = markdown_table(result)
    lines = ["# Evaluation", "", *[f"> **Warning**: {w}\n" for w in result.test.warnings], table, "",
             "Mean with 95% interval: ± is a Student-t interval over images; [low, high] a bootstrap interval over the "
             "generated images (FID, KID). ID similarity compares each generated image with its source face; "
             "expression errors compare SMIRK's re-extraction with the target FLAME vector.", ""]
    if len(skipped):
        lines += ["## Skipped inputs", "", "| role | path | reason |", "|---|---|---|"]
        lines += [f"| {s.role} | {s.origin} | {s.reason} |" for s in result.test.skipped] + [""]
    (out / "results.md").write_text("\n".join(lines))
    files = {"csv": out / "results.csv", "markdown": out / "results.md",
             "plot": component_plot(components, out / "expression_components.png"),
             "grids": image_grids(result, out / "grids", grid_pairs), "per_image": out / "per_image.csv"}
    return {**files, "table": table, "summary": summary, "skipped": skipped}


def log_to_loggers(loggers: list[Any], files: dict[str, Any]) -> None:
    """Send the tables and images to every logger that takes them (W&B)."""
    for lg in loggers:
        if not hasattr(lg, "log_table"):
            continue
        lg.log_table(key="eval/results", dataframe=files["summary"])
        if len(files["skipped"]):
            lg.log_table(key="eval/skipped", dataframe=files["skipped"])
        lg.log_image(key="eval/expression_components", images=[str(files["plot"])])
        if files["grids"]:
            lg.log_image(key="eval/grids", images=[str(p) for p in files["grids"]])
        log.info("logged results to %s", type(lg).__name__)
