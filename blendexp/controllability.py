"""Controllability curves: ``python -m blendexp.controllability component=jaw.0 [points=9] [samples=2] [...]``.

Sweeps one FLAME component from its minimum to its maximum, generates every value from the same seeds, re-extracts
the component from the generated images with SMIRK and writes requested vs measured as CSV and a plot. A
controllable adapter follows the identity line; a flat curve means the component is ignored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
from omegaconf import DictConfig

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.errors import run_entry
from blendexp.flame import component_index

if TYPE_CHECKING:  # pandas, matplotlib, torch and diffusers load in the commands, after Hydra composed the config
    import pandas as pd


def sweep_values(component: str, value_range: Any, points: int) -> np.ndarray:
    """``points`` evenly spaced requested values over the configured range (or the component's own)."""
    from blendexp.flame import component_range

    component_index(component)  # unknown names fail here, listing the valid ones
    low, high = component_range(component) if value_range is None else (float(v) for v in value_range)
    if points < 2 or not low < high:
        raise ValueError(f"a sweep needs points >= 2 and range low < high; got points={points}, range=[{low}, {high}]")
    return np.linspace(low, high, points, dtype=np.float32)


def fit_line(requested: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Slope, intercept and Pearson r of measured vs requested (images without a face left out): 1, 0, 1 is perfect."""
    ok = np.isfinite(measured)
    if ok.sum() < 2 or np.ptp(measured[ok]) == 0:
        return {"slope": 0.0 if ok.sum() >= 2 else float("nan"), "intercept": float(np.nanmean(measured)),
                "pearson_r": float("nan")}
    slope, intercept = np.polyfit(requested[ok], measured[ok], 1)
    return {"slope": float(slope), "intercept": float(intercept),
            "pearson_r": float(np.corrcoef(requested[ok], measured[ok])[0, 1])}


def plot_curve(frame: pd.DataFrame, component: str, fit: dict[str, float], path: Path) -> Path:
    """Requested vs measured: each image, the per-value mean ± std, and the identity line a perfect adapter follows."""
    import matplotlib

    matplotlib.use("Agg")  # file-only backend
    import matplotlib.pyplot as plt

    from blendexp.flame import component_label

    stats = frame.groupby("requested")["measured"].agg(["mean", "std"]).reset_index()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    lo, hi = float(frame["requested"].min()), float(frame["requested"].max())
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="requested = measured")
    ax.scatter(frame["requested"], frame["measured"], s=10, alpha=0.4, label="images")
    ax.errorbar(stats["requested"], stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                label="mean ± std")
    ax.set_xlabel(f"requested {component_label(component)}")
    ax.set_ylabel("measured (SMIRK on the generated image)")
    ax.set_title(f"{component}: slope {fit['slope']:.3g}, r {fit['pearson_r']:.3g}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def controllability(cfg: DictConfig) -> dict[str, Any]:
    """Run the sweep; returns the written files and the fitted line (what tests and sweeps read)."""
    import pandas as pd

    from blendexp.commands import check_expressions, check_inputs, container, load_session, sampling
    from blendexp.flame import apply_edits
    from blendexp.images import image_grid

    start = time.perf_counter()
    component = str(cfg.component)
    values = sweep_values(component, container(cfg.range), int(cfg.points))
    check_inputs(cfg)
    named = check_expressions(cfg.expression, cfg.edits)
    if len(named) != 1:
        raise ValueError(f"expression must be one vector to sweep from; got {len(named)} ({[n for n, _ in named]})")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe, face, reference = load_session(cfg)
    (_, start_exp), = pipe.load_expressions(container(cfg.expression))
    exps = np.repeat(apply_edits(start_exp, container(cfg.edits))[None], len(values), axis=0)
    exps[:, component_index(component)] = values
    samples = int(cfg.samples)
    images = pipe(face, exps, reference, num_images=samples, **sampling(cfg))  # value-major: row p * samples + k
    measured = pipe.measure_expressions(list(images))[:, component_index(component)]
    requested = np.repeat(values, samples)
    frame = pd.DataFrame({"component": component, "requested": requested, "sample": np.tile(np.arange(samples), len(values)),
                          "seed": int(cfg.seed) + np.tile(np.arange(samples), len(values)), "measured": measured,
                          "face": np.isfinite(measured)})
    frame.to_csv(out / "controllability.csv", index=False)
    fit = fit_line(requested, measured)
    columns = [images[p * samples:(p + 1) * samples] for p in range(len(values))]
    image_grid([[col[k] for col in columns] for k in range(samples)]).save(out / "sweep.png")
    files = {"csv": out / "controllability.csv", "plot": plot_curve(frame, component, fit, out / "controllability.png"),
             "sweep": out / "sweep.png"}
    print(f"blendexp: {component} swept over [{values[0]:.3g}, {values[-1]:.3g}] in {len(values)} steps x {samples} "
          f"samples ({int(frame['face'].sum())}/{len(frame)} faces found) in {time.perf_counter() - start:.1f} s: "
          f"slope {fit['slope']:.3g}, r {fit['pearson_r']:.3g} (ideal: 1, 1)\n"
          + "\n".join(f"  {k + ':':9s} {v}" for k, v in files.items()))
    return {**files, **fit}


@hydra.main(version_base="1.3", config_path="conf", config_name="controllability")
def main(cfg: DictConfig) -> None:
    """Hydra entry; user errors become one clear line and exit status 1 instead of a traceback."""
    run_entry(controllability, cfg)


if __name__ == "__main__":
    main()
