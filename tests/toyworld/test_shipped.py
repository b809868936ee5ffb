"""The trained toy models the repository ships in data/toy (``python -m blendexp.toyworld.assets --ship``): complete,
loadable by the real loaders, and as good as the build measured them on identities they never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from blendexp.faces.expression import load_smirk
from blendexp.faces.identity import ArcFaceONNX
from blendexp.toyworld.annotators import base_id_similarity, expression_metrics, identity_metrics
from blendexp.toyworld.assets import SHIPPED, SHIPPED_ROOT, decoded, render_set
from blendexp.toyworld.params import sample_expression
from tests.conftest import missed_thresholds

ARCFACE, SMIRK = SHIPPED_ROOT / "models/antelopev2/arcface.onnx", SHIPPED_ROOT / "models/smirk/SMIRK_em1.pt"
FRESH_STREAM = "fresh"  # identities no build step trained or measured on


def test_every_shipped_file_is_there_in_the_official_layout() -> None:
    from blendexp.models.arc2face import Arc2FaceBase

    assert [f for f in SHIPPED if not (SHIPPED_ROOT / f).exists()] == []
    base = Arc2FaceBase.from_pretrained(str(SHIPPED_ROOT / "models"), str(SHIPPED_ROOT / "stable-diffusion-v1-5"))
    assert base.scheduler.config.prediction_type == "v_prediction"
    readme = (SHIPPED_ROOT / "README.md").read_text()
    assert "python -m blendexp.toyworld.assets" in readme  # says how the files were made
    metrics = json.loads((SHIPPED_ROOT / "metrics.json").read_text())
    assert metrics["base"]["id_auc"] > 0.95  # the build's own measurement of the shipped base


# Each threshold sits below the worst of the re-measurements over render seeds (other unseen identities) and CPU code
# paths, with the margin in tests/margins/shipped.json (scripts/measure_margins.py). What the build measured on its 48
# held-out identities (metrics.json): recogniser AUC 1.000, accuracy 0.998; expression MAE 0.53x the mean predictor's,
# eyelids 0.16x / 0.17x, jaw opening 0.23x on renders; on VAE round trips (as generated faces look) smiles 0.38x /
# 0.35x, brow furrow 0.35x, eyelids 0.25x / 0.26x, jaw opening 0.30x; base ID AUC 0.985, matched 0.535 vs 0.005 for
# other identities. On round trips of 384 fresh faces per seed (3 seeds x 2 code paths) these six read below 0.5 in
# every run (worst: smiles 0.409 / 0.350, furrow 0.397, eyelids 0.278 / 0.281, jaw 0.313), 6 or 7 components in all:
# the closed loop's readable set (issue #20 asks for at least six). The build before this one (d31590f, smaller eyes)
# read the eyelids at 0.42-0.54 here, so they had no threshold. Earlier moves: the recogniser's AUC from > 0.95 to
# > 0.94, the pooled expression MAE from < 0.95 to < 0.96 of the mean predictor's.
THRESHOLDS = {
    "identity.roc_auc": (">", 0.94), "identity.verification_accuracy": (">", 0.9),
    "expression.mae_vs_mean_predictor": ("<", 0.96),
    "expression.eyelid_left_vs_mean_predictor": ("<", 0.5), "expression.eyelid_right_vs_mean_predictor": ("<", 0.5),
    "expression.jaw_open_vs_mean_predictor": ("<", 0.5),
    "expression.jaw_open_decoded_vs_mean_predictor": ("<", 0.5),  # what the closed loop calls readable
    "expression.smile_left_decoded_vs_mean_predictor": ("<", 0.5),
    "expression.smile_right_decoded_vs_mean_predictor": ("<", 0.5),
    "expression.brow_furrow_decoded_vs_mean_predictor": ("<", 0.5),
    "expression.eyelid_left_decoded_vs_mean_predictor": ("<", 0.5),
    "expression.eyelid_right_decoded_vs_mean_predictor": ("<", 0.5),
    "base.id_auc": (">", 0.9), "base.matched_minus_random": (">", 0.25),
}


# the components the build reads on VAE round trips (data/toy/metrics.json, `readable_decoded`)
DECODED = ("exp.0 (smile_left)", "exp.1 (smile_right)", "exp.4 (brow_furrow)", "eyelid.0 (eyelid_left)",
           "eyelid.1 (eyelid_right)", "jaw.0 (jaw_open)")


def annotator_figures(seed: int = 0) -> dict[str, float]:
    """The shipped recogniser and SMIRK on 48 unseen identities x 8 photos (rendered as the build's held-out set)."""
    faces = render_set(seed=seed, stream=FRESH_STREAM, subjects=range(16, 64), per_subject=8, size=128, nuisance=1.0)
    ident = identity_metrics(ArcFaceONNX(ARCFACE), faces["images"], faces["labels"])
    rng = np.random.default_rng(1)
    prior_mean = np.mean([sample_expression(rng) for _ in range(5000)], axis=0)  # the best constant prediction
    (vae_round_trips,) = decoded(SHIPPED_ROOT / "stable-diffusion-v1-5/vae", (faces["images"],), 64)
    exp = expression_metrics(load_smirk(SMIRK), faces["images"], vae_round_trips, faces["expressions"], prior_mean)
    ratio = lambda pair: pair[0] / pair[1]
    per, dec = exp["per_component_mae_vs_mean_predictor"], exp["per_component_mae_vs_mean_predictor_decoded"]
    return {"identity.roc_auc": ident["roc_auc"], "identity.verification_accuracy": ident["verification_accuracy"],
            "expression.mae_vs_mean_predictor": exp["mae"] / exp["mean_predictor_mae"],
            "expression.eyelid_left_vs_mean_predictor": ratio(per["eyelid.0 (eyelid_left)"]),
            "expression.eyelid_right_vs_mean_predictor": ratio(per["eyelid.1 (eyelid_right)"]),
            "expression.jaw_open_vs_mean_predictor": ratio(per["jaw.0 (jaw_open)"]),
            **{f"expression.{key.split('(')[1][:-1]}_decoded_vs_mean_predictor": ratio(dec[key]) for key in DECODED},
            "expression.readable_decoded": float(len(exp["readable_decoded"]))}


def base_figures(grid: Path, seed: int = 0) -> dict[str, float]:
    """The shipped base drawing 16 unseen identities (one sample, 10 steps), scored by the shipped recogniser."""
    fresh = render_set(seed=seed, stream=FRESH_STREAM, subjects=range(16), per_subject=4, size=128, nuisance=1.0)
    m = base_id_similarity(SHIPPED_ROOT, ARCFACE, fresh, size=64, identities=16, samples=1,
                           steps=10, guidance=3.0, seed=seed, grid=grid)
    return {"base.id_auc": m["id_auc"], "base.matched_minus_random": m["id_sim_matched"] - m["id_sim_random"]}


def measure_figures(seed: int, work: Path) -> dict[str, float]:
    """Both re-measurements with ``seed`` (scripts/measure_margins.py)."""
    return {**annotator_figures(seed), **base_figures(work / "grid.png", seed)}


def test_shipped_annotators_read_unseen_faces() -> None:
    figures = annotator_figures()
    assert missed_thresholds(figures, {k: v for k, v in THRESHOLDS.items() if k in figures}) == []


def test_shipped_base_draws_the_identity_it_is_given(tmp_path: Path) -> None:
    # A base that ignores the ID (the epsilon-prediction recipe) scores AUC 0.52, the 1200-step base of the 21 dB VAE
    # 0.86.
    figures = base_figures(tmp_path / "grid.png")
    assert missed_thresholds(figures, {k: v for k, v in THRESHOLDS.items() if k in figures}) == []
    assert (tmp_path / "grid.png").is_file()
