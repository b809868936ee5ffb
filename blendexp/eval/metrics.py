"""Evaluation metrics on batches: identity similarity, FLAME expression error, FID/KID, and 95% intervals.

Per-image metrics are summarised as a mean with a Student-t 95% confidence interval. FID and KID are set-level:
the point estimate uses every image, the interval is a bootstrap over the generated images (the real set stays
fixed), shifted by the bootstrap bias: a resample repeats images, which inflates FID and KID, so raw percentiles
would sit above the full-set estimate. FID and KID are torchmetrics' own, fed with features computed once per image set (``features.py``), so the
bootstrap re-uses them instead of re-running the feature network. Ratios of two methods' means over the same
(source, target) pairs get a two-way bootstrap interval: sources and targets resampled independently.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import stats
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from blendexp.flame import EXPRESSION, EYELIDS, JAW


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is labelled and which direction is better (tables mark the best method)."""

    label: str
    higher_is_better: bool


METRICS: dict[str, MetricSpec] = {
    "no_face_rate": MetricSpec("no face", False),
    "id_sim": MetricSpec("ID sim (ArcFace)", True),
    "id_sim_facenet": MetricSpec("ID sim (facenet)", True),
    "exp_mae": MetricSpec("expr MAE", False),
    "exp_l2": MetricSpec("expr L2", False),
    "exp_mae_expression": MetricSpec("expression MAE", False),
    "exp_mae_eyelid": MetricSpec("eyelid MAE", False),
    "exp_mae_jaw": MetricSpec("jaw MAE", False),
    "bg_l1": MetricSpec("background L1 to source", False),
    "fid": MetricSpec("FID", False),
    "kid": MetricSpec("KID", False),
}


@dataclass(frozen=True)
class Estimate:
    """A summary value with its 95% interval and the number of values behind it."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def symmetric(self) -> bool:
        """True for mean ± half-width intervals (t), False for bootstrap percentiles."""
        return math.isclose(self.high - self.mean, self.mean - self.low, rel_tol=1e-6, abs_tol=1e-12)


def mean_ci(values: np.ndarray, confidence: float = 0.95) -> Estimate:
    """Mean and Student-t interval of the finite values (NaN marks images where a metric could not be computed)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = float(v.mean())
    if v.size == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    sem = float(v.std(ddof=1)) / math.sqrt(v.size)
    half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1)) * sem
    return Estimate(mean, mean - half, mean + half, int(v.size))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) embeddings; rows with NaN (no face) stay NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norm, 1e-12)


def expression_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image errors of re-extracted FLAME vectors (N, 55) against the targets (N, 55), and ``abs`` (N, 55)."""
    diff = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    abs_err = np.abs(diff)
    return {
        "exp_mae": abs_err.mean(axis=1),
        "exp_l2": np.linalg.norm(diff, axis=1),
        "exp_mae_expression": abs_err[:, EXPRESSION].mean(axis=1),
        "exp_mae_eyelid": abs_err[:, EYELIDS].mean(axis=1),
        "exp_mae_jaw": abs_err[:, JAW].mean(axis=1),
        "abs": abs_err,
    }


def border_l1(images: list[np.ndarray], references: list[np.ndarray], band: float = 0.125) -> np.ndarray:
    """Mean absolute pixel difference (0-1) to the reference in the outer ``band`` of the frame, where aligned
    faces show background and hair: how much of a reference photo's appearance a generation keeps."""
    out = []
    for image, ref in zip(images, references):
        h, w = image.shape[:2]
        if ref.shape[:2] != (h, w):
            ref = np.asarray(Image.fromarray(ref).resize((w, h), Image.Resampling.BICUBIC))
        mask = np.ones((h, w), bool)
        bh, bw = max(1, round(h * band)), max(1, round(w * band))
        mask[bh:h - bh, bw:w - bw] = False
        out.append(np.abs(image.astype(np.float64) - ref.astype(np.float64))[mask].mean() / 255.0)
    return np.asarray(out)


class _Given(nn.Module):
    """The "feature extractor" torchmetrics sees: features were already computed, so it passes them through."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Identity."""
        return features


def _fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """torchmetrics' FID between two feature sets (N, D)."""
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def _kid(real: torch.Tensor, fake: torch.Tensor, subsets: int, subset_size: int, seed: int) -> float:
    """torchmetrics' KID (mean over random subsets) between two feature sets, with seeded subset draws."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets,
                                         subset_size=min(subset_size, len(real), len(fake)))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return float(metric.compute()[0])


def set_metrics(real: torch.Tensor, fake: torch.Tensor, bootstrap: int = 20, kid_subsets: int = 50,
                kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """FID and KID of generated features against real ones, with bootstrap 95% intervals over the generated set."""
    if len(real) < 2 or len(fake) < 2:
        nan = Estimate(math.nan, math.nan, math.nan, len(fake))
        return {"fid": nan, "kid": nan}
    point = {"fid": _fid(real, fake), "kid": _kid(real, fake, kid_subsets, kid_subset_size, seed)}
    draws: dict[str, list[float]] = {"fid": [], "kid": []}
    rng = np.random.default_rng(seed)
    for b in range(bootstrap):
        sample = fake[torch.from_numpy(rng.integers(0, len(fake), len(fake)))]
        draws["fid"].append(_fid(real, sample))
        draws["kid"].append(_kid(real, sample, kid_subsets, kid_subset_size, seed + 1 + b))
    out = {}
    for key, value in point.items():
        low, high = math.nan, math.nan
        if bootstrap >= 2:
            bias = float(np.mean(draws[key])) - value  # resamples repeat images, which inflates both metrics
            low, high = (float(q) - bias for q in np.percentile(draws[key], [2.5, 97.5]))
        out[key] = Estimate(value, low, high, len(fake))
    return out


def cell_totals(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sum and count of ``values`` per (source, target) cell (``rows``, ``cols`` are their indices); NaNs left out."""
    keep = np.isfinite(values)
    sums, counts = np.zeros(shape), np.zeros(shape)
    np.add.at(sums, (rows[keep], cols[keep]), values[keep])
    np.add.at(counts, (rows[keep], cols[keep]), 1)
    return sums, counts


def two_way_ratio(numerator: tuple[np.ndarray, np.ndarray], denominator: tuple[np.ndarray, np.ndarray],
                  resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> Estimate:
    """Ratio of two means over (source, target) cells with a two-way bootstrap 95% interval: sources and targets
    are each resampled with replacement, since a study's pairs share both, and an image-level bootstrap would treat
    one source's many images as independent evidence. Both means use the same draws (a paired ratio)."""
    (num_s, num_n), (den_s, den_n) = numerator, denominator
    rng = np.random.default_rng(seed)
    n_src, n_tgt = num_s.shape
    ws = rng.multinomial(n_src, np.full(n_src, 1 / n_src), size=resamples).astype(float)
    wt = rng.multinomial(n_tgt, np.full(n_tgt, 1 / n_tgt), size=resamples).astype(float)

    def mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.einsum("bs,st,bt->b", ws, sums, wt) / np.einsum("bs,st,bt->b", ws, counts, wt)

    point = (num_s.sum() / num_n.sum()) / (den_s.sum() / den_n.sum())
    ratios = mean(num_s, num_n) / mean(den_s, den_n)
    ratios = ratios[np.isfinite(ratios)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail]) if len(ratios) else (math.nan, math.nan)
    return Estimate(float(point), float(low), float(high), int(num_n.sum()))
