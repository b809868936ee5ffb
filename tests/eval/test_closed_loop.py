"""Closed loop at reduced size (``benchmarks/closed_loop.py`` is the full one): on the shipped toy base, both adapters
are trained and evaluated through the entry points users call, scored by the shipped toy annotators.

Asserted: the Expression Adapter lowers the expression error the toy SMIRK reads on the test split to <= 0.8x
Arc2Face alone's and keeps the identity (ID similarity >= 0.9x Arc2Face's), at the fixed scale this test chose on its
validation split; the trained adapter moves the jaw opening the toy SMIRK reads in the requested
direction through the user's generation path (a controllability sweep; at scale 0 and untrained it does not), the
Reference Adapter lowers the background distance to the reference, the negative controls (the adapter at scale 0, an
untrained adapter, on the same pairs) miss the expression goal, the ceiling (each target's own face through the VAE,
for every source) is the right face and reads closer to the request than Arc2Face and the trained adapter, all
ratios are measured with two-way bootstrap intervals, ``--check`` exits 1 exactly when a goal is missed, and the
scale route: a calibration on the validation split is read and recorded by the test run, and one made with another
split or adapter is refused naming the mismatch."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from diffusers import AutoencoderKL
from PIL import Image

from benchmarks.closed_loop import CEILING
from blendexp.config import REPO_ROOT
from blendexp.data.datamodule import tar_members
from blendexp.data.image_sets import read_images
from blendexp.toyworld.assets import SHIPPED_ARCFACE, SHIPPED_ROOT, SHIPPED_VAE, TOY_ID_MODEL, toy_embedder
from blendexp.toyworld.shards import write_split
from tests.conftest import missed_thresholds, run_cli

TRAIN_SUBJECTS, VAL_SUBJECTS, CLIP_SUBJECTS = 1200, 12, 40  # 6 validation + 6 test subjects


def toy_data(root: Path) -> Path:
    """Stills for the Expression Adapter, clips for the Reference Adapter and held-out stills, embedded by the
    shipped toy recogniser; validation identities come from another seed, so no model has seen them."""
    common = dict(size=64, per_shard=1000, embed=toy_embedder(SHIPPED_ROOT / SHIPPED_ARCFACE), id_model=TOY_ID_MODEL,
                  vae=AutoencoderKL.from_pretrained(SHIPPED_ROOT / SHIPPED_VAE).eval())
    write_split(root / "shards", "train", range(TRAIN_SUBJECTS), per_subject=4, seed=0, **common)
    write_split(root / "shards", "val", range(VAL_SUBJECTS), per_subject=4, seed=1, **common)
    write_split(root / "clips", "clips", range(TRAIN_SUBJECTS, TRAIN_SUBJECTS + CLIP_SUBJECTS), per_subject=8, seed=0,
                clips=True, **common)
    return root


# The jaw sweep's slope (measured over requested jaw opening, at scale 1; tests/margins/closed_loop.json, seeds
# 0 / 1 / 2, native = AVX2 on this AMD EPYC): trained 0.412 / 0.391 / 0.378, untrained -0.040 / 0.012 / 0.005; at
# scale 0 the images do not change (slope 0). JAW_SLOPE lies 0.23 below the worst trained and 0.14 above the worst
# untrained run.
JAW_SLOPE = 0.15
# The reduced closed loop's thresholds, each below the worst of its runs over seeds and CPU code paths with the margin
# recorded in tests/margins/closed_loop.json (``python scripts/measure_margins.py closed-loop --seeds 0 1 2 --isa
# native --jobs 3 --work DIR``). The shipped base draws the identity it is given (about 0.62 cosine on the toy
# recogniser, 0 for strangers) and the adapter must not lose it: ID ratio >= 0.9. The trained adapter must reach
# EXPR_GOAL (0.8x) and the negative controls (the adapter at scale 0, an untrained adapter) must miss it (untrained
# worst 0.947). Those two goals are the closed-loop issue's, not set from the runs: expression worst 0.661 (margin
# 0.139), identity worst 0.907 (seed 1; margin 0.0075, under the policy's 0.05 of tests/margins/README.md: the scale
# that validation chose trades identity for expression; seed 0, which the test runs: 0.661 / 0.959).
# The Reference Adapter must lower the background distance to the reference (ratio < 1): its 150 steps lower it
# little on this base (0.966 / 0.934 / 0.975, margin 0.025, under the policy's 0.05; the former bound 0.95 was set
# on the previous base, where the worst run read 0.886).
# The ceiling's expression error over Arc2Face's must be below 1: the toy SMIRK reads each readable component of a
# decoded face at <= 0.5x the mean predictor's error (data/toy/metrics.json), and Arc2Face alone ignores the requested
# expression (worst 0.247).
CEILING_BELOW = 1.0
EXPR_GOAL = 0.8
THRESHOLDS = {"arc2face_id_sim": (">", 0.3), "id_ratio": (">=", 0.9), "jaw_slope": (">", JAW_SLOPE),
              "expr_ratio": ("<=", EXPR_GOAL), "bg_l1_ref_vs_expr": ("<", 1.0),
              "expr_ratio_expr_scale0": (">", EXPR_GOAL), "expr_ratio_expr_untrained": (">", EXPR_GOAL),
              "ceiling_ratio": ("<", CEILING_BELOW)}


# The reduced loop's Expression Adapter: 7200 steps of batch 16 with 32 tokens and a cosine learning rate, trained on
# the stills of 1200 subjects (TRAIN_SUBJECTS), pinned here so that its margins (tests/margins/closed_loop.json,
# closed_loop_scale.json) hold whatever the full recipe becomes. Chosen on this test's validation split: on the
# toy base shipped at 0ace9c7 (it draws identity more strongly) 3600 steps read 0.82-0.96 of Arc2Face's
# expression error at scales 1.5-2.5 (seeds 0-1, closed_loop_scale.json at fa06a6b), 7200 read 0.66-0.75 at 1.5
# (seeds 0-2, closed_loop_scale.json). The ``wall_s`` of those margins files exclude training: their runs reused the
# adapters that a first closed-loop-scale run (four scales) trained in the same ``--work`` folder, three at a time on
# one thread each, in 2665-2677 s per run with data and evaluation
# (experiments/toy_readability/results/reduced_loop_7200_val_4scales.json).
REDUCED_STEPS = "7200"
REDUCED_OVERRIDES = ("model.adapter.num_tokens=32", "model.optim.schedule=cosine")
# Its Reference Adapter's LoRA rank, pinned to the one its margins were measured with (the full recipe's is 16).
REDUCED_REF_OVERRIDES = ("model.lora.rank=8", "model.lora.alpha=8")


def closed_loop_command(data: Path, out: Path) -> list[str]:
    """The reduced closed loop (also run by scripts/measure_margins.py, with ``--seed``)."""
    return [sys.executable, "benchmarks/closed_loop.py", "--toy", str(SHIPPED_ROOT), "--data", str(data),
            "--out", str(out), "--expr-steps", REDUCED_STEPS, "--ref-steps", "150", "--batch-size", "16",
            "--sources", "6", "--targets", "6", "--gen-steps", "10", "--expr-overrides", *REDUCED_OVERRIDES,
            "--ref-overrides", *REDUCED_REF_OVERRIDES]


# The reduced test's fixed scale, chosen on its validation split over seeds 0-2 (tests/margins/closed_loop_scale.json,
# ``python scripts/measure_margins.py closed-loop-scale --seeds 0 1 2 --isa native --jobs 3 --work DIR``) by
# ``--calibrate``'s own rule (the lowest expression error among scales with ID ratio >= 0.9) held on every seed.
# Scales 1 / 1.25 / 1.5 / 2 / 2.5 read 0.734-0.808 / 0.695-0.778 / 0.661-0.746 / 0.618-0.675 / 0.638-0.671 of
# Arc2Face's expression error, at worst 0.965 / 0.951 / 0.930 / 0.881 / 0.826 of its identity: 2 loses it on seeds 0
# and 1 (the rule picks 2 on seed 2 only), so 1.5, which also keeps both goals with the widest margin (0.030).
SCALE_VALUE = 1.5
SCALE = ["--expr-scale", f"{SCALE_VALUE:g}"]


def jaw_slope(data: Path, out: Path, adapter: Path | None, scale: float = 1.0, seed: int = 0) -> float:
    """Slope of the jaw opening the toy SMIRK reads over the one requested (0 to 0.4, from a held-out face), through
    the user's generation path: ``python -m blendexp.controllability`` (ExpressionPipeline)."""
    res = run_cli("blendexp.controllability", "component=jaw.0", "points=5", "samples=4", "steps=10", f"seed={seed}",
                  f"identity={data}/shards/val-000000.tar", f"paths.models={SHIPPED_ROOT}/models",
                  f"paths.sd15={SHIPPED_ROOT}/stable-diffusion-v1-5", f"expression_scale={scale}", f"out_dir={out}",
                  *([f"expression_adapter={adapter}"] if adapter else []), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    curve = pd.read_csv(out / "controllability.csv")
    return float(np.polyfit(curve["requested"], curve["measured"], 1)[0])


def closed_loop_figures(out: Path) -> dict[str, float]:
    """The ratios of the test run in ``out`` and Arc2Face's own ID similarity."""
    result = json.loads((out / "closed_loop.json").read_text())
    return {"arc2face_id_sim": result["methods"]["arc2face"]["id_sim"], "id_ratio": result["id_ratio"],
            "expr_ratio": result["expr_ratio"], "bg_l1_ref_vs_expr": result["bg_l1_ref_vs_expr"],
            "ceiling_ratio": result["ceiling"]["expr_ratio"]["ratio"],
            **{f"expr_ratio_{m}": c["ratio"] for m, c in result["controls"].items()}}


def measure_figures(seed: int, work: Path) -> dict[str, float]:
    """The reduced closed loop with ``--seed`` in ``work`` (scripts/measure_margins.py)."""
    cmd = [*closed_loop_command(toy_data(work / "data"), work / "out"), *SCALE, "--seed", str(seed)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=7200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    adapter = work / "out" / "closed_loop_expr" / "closed_loop"
    return {**closed_loop_figures(work / "out"),
            "jaw_slope": jaw_slope(work / "data", work / "sweep", adapter, seed=seed),
            "jaw_slope_untrained": jaw_slope(work / "data", work / "fresh", None, seed=seed)}


VALIDATION_SCALES = ("1", "1.25", "1.5", "2", "2.5")


def measure_validation_scales(seed: int, work: Path) -> dict[str, float]:
    """The reduced closed loop's calibration on the validation split (scripts/measure_margins.py
    closed-loop-scale): each scale's expression and ID ratios, from which ``SCALE`` is chosen."""
    cmd = [*closed_loop_command(toy_data(work / "data"), work / "out"), "--seed", str(seed), "--split", "val",
           "--calibrate", *VALIDATION_SCALES]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=7200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cal = json.loads((work / "out" / "calibration.json").read_text())
    return {"chosen": cal["expr_scale"], **{f"{k}@{s}": v[k]["ratio"] for s, v in cal["scales"].items()
                                            for k in ("expr_ratio", "id_ratio")}}


def test_validation_and_test_splits_share_no_identity_and_no_target(tmp_path: Path) -> None:
    from benchmarks.closed_loop import split_faces, split_inputs

    write_split(tmp_path, "val", range(7), per_subject=3, size=32, seed=1, per_shard=5)  # odd: test gets 4 subjects
    shards = f"{tmp_path}/val-*.tar"

    def selected(split: str, **limits: int | None) -> dict[str, list[str]]:
        sources, targets = split_faces(split_inputs(shards, split, **limits))
        return {"sources": [i.subject for i in sources], "targets": [i.subject for i in targets]}

    val, test = selected("val", sources=None, targets=None), selected("test", sources=None, targets=None)
    assert val["sources"] == ["s00000", "s00001", "s00002"] and len(val["targets"]) == 9
    assert test["sources"] == ["s00003", "s00004", "s00005", "s00006"] and len(test["targets"]) == 12
    assert set(val["targets"]) == set(val["sources"]) and set(test["targets"]) == set(test["sources"])
    assert selected("test", sources=2, targets=5) == {"sources": test["sources"][:2], "targets": test["targets"][:5]}
    with pytest.raises(SystemExit, match="--sources 5, but the val split has 3"):
        split_inputs(shards, "val", 5, None)


def test_calibration_provenance_reads_shard_members_not_tar_headers(tmp_path: Path) -> None:
    from benchmarks.closed_loop import digest

    write_split(tmp_path / "a", "val", range(2), per_subject=2, size=32, seed=1, per_shard=10)
    write_split(tmp_path / "other", "val", range(2), per_subject=2, size=32, seed=2, per_shard=10)
    shard, rerendered = tmp_path / "a" / "val-000000.tar", tmp_path / "rerendered.tar"
    with tarfile.open(shard) as tar, tarfile.open(rerendered, "w") as out:  # the same faces, written an hour later
        for member in tar:
            data = tar.extractfile(member).read()
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime = len(data), member.mtime + 3600
            out.addfile(info, io.BytesIO(data))
    with tarfile.open(shard) as tar, tarfile.open(rerendered) as again:
        assert [m.mtime + 3600 for m in tar] == [m.mtime for m in again]
    assert digest(tar_members(shard)) == digest(tar_members(rerendered))
    assert digest(tar_members(shard)) != digest(tar_members(tmp_path / "other" / "val-000000.tar"))


def test_mistakes_are_refused_before_anything_trains(tmp_path: Path) -> None:
    """A mistyped override of either run and a test run without a matching calibration stop in seconds, naming the
    mistake, before the Expression Adapter's hour of training (nothing is written under ``--out``)."""
    data = tmp_path / "data"
    for folder, split, clips in (("shards", "train", False), ("shards", "val", False), ("clips", "clips", True)):
        write_split(data / folder, split, range(2), per_subject=2, size=32, seed=1, per_shard=10, clips=clips)
    out = tmp_path / "out"

    def closed_loop(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "benchmarks/closed_loop.py", "--toy", str(SHIPPED_ROOT), "--data",
                               str(data), "--out", str(out), *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)

    for flag in ("--expr-overrides", "--ref-overrides"):
        typo = closed_loop("--expr-scale", "1", flag, "model.optim.shedule=cosine")
        assert typo.returncode != 0 and f"the {flag} run's config does not compose" in typo.stderr, typo.stderr
        assert "shedule" in typo.stderr, typo.stderr
    # a validation calibration (it trains the Expression Adapter only) is checked before training too
    calibrating = closed_loop("--split", "val", "--calibrate", "1", "--expr-overrides", "model.bogus=1")
    assert calibrating.returncode != 0 and "the --expr-overrides run" in calibrating.stderr, calibrating.stderr
    missing = closed_loop()
    assert missing.returncode != 0 and "no calibration at" in missing.stderr, missing.stderr
    from benchmarks.closed_loop import provenance, toy_layout

    made_with = provenance(toy_layout(SHIPPED_ROOT), data, "zeros", 3.0)
    for key, value in (("split", "test"), ("data", "0" * 16), ("negative_expression", "mean"), ("guidance", 5.0)):
        bad = tmp_path / f"calibration-{key}.json"
        bad.write_text(json.dumps({**made_with, key: value, "expr_adapter": "0" * 16, "expr_scale": 1.5}))
        refused = closed_loop("--calibration", str(bad))
        assert refused.returncode != 0 and f"{key}: made with {value!r}, this run has" in refused.stderr, refused.stderr
    assert not out.exists()


def assert_ceiling(result: dict, data: Path, folder: Path) -> None:
    """The ceiling holds, for every source, each target's own face through the VAE (nearer to that target's shard
    image than to any other's), and a perfect copy of the expression reads closer to the request than the trained
    adapter (and than Arc2Face: ``ceiling_ratio`` in ``THRESHOLDS``)."""
    targets = {t.name: t.image.astype(float) for t in read_images(f"{data}/shards/val-*.tar", "target", [])}
    sources = sorted(p.name for p in folder.iterdir())
    assert len(sources) == 6, sources
    for source in sources:
        stored = sorted(folder.glob(f"{source}/*_0.png"))
        assert len(stored) == 6, stored
        for path in stored:
            face = np.asarray(Image.open(path).convert("RGB"), dtype=float)
            nearest = min(targets, key=lambda t: np.abs(targets[t] - face).mean())
            assert path.name == f"{nearest}_0.png", (path, nearest)
    ratio = result["ceiling"]["expr_ratio"]
    assert ratio["low"] <= ratio["ratio"] <= ratio["high"], result["ceiling"]
    assert ratio["ratio"] < result["expr_ratio"], (result["ceiling"], result["expr_ratio"])


@pytest.mark.slow
def test_reduced_closed_loop_trains_evaluates_and_keeps_identity(tmp_path: Path) -> None:
    data = toy_data(tmp_path / "data")
    command = closed_loop_command(data, tmp_path / "out")
    res = subprocess.run([*command, *SCALE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "closed_loop.json").read_text())
    assert (result["split"], result["expr_scale"], result["scale_from"]) == ("test", SCALE_VALUE, "--expr-scale")
    assert set(result["methods"]) == {"arc2face", "expr_adapter", "expr_ref", "expr_scale0", "expr_untrained", CEILING}
    assert "jaw.0" in result["readable_components"]  # what the toy SMIRK reads on decoded faces
    assert_ceiling(result, data, tmp_path / "out" / "evaluate" / f"{CEILING}_test")
    # the user's generation path follows the requested jaw opening; Arc2Face alone (scale 0) and an untrained
    # adapter do not (negative controls: the threshold must separate them)
    adapter, sweeps = tmp_path / "out" / "closed_loop_expr" / "closed_loop", tmp_path / "sweeps"
    slopes = {"trained": jaw_slope(data, sweeps / "trained", adapter),
              "scale 0": jaw_slope(data, sweeps / "0", adapter, 0), "untrained": jaw_slope(data, sweeps / "u", None)}
    assert abs(slopes["scale 0"]) < JAW_SLOPE and slopes["untrained"] < JAW_SLOPE, slopes
    # negative controls on the same pairs: the adapter at scale 0 and an untrained one miss the expression ratio
    assert set(result["controls"]) == {"expr_scale0", "expr_untrained"} and result["controls_miss_goal"], result
    figures = {**closed_loop_figures(tmp_path / "out"), "jaw_slope": slopes["trained"]}
    assert missed_thresholds(figures, THRESHOLDS) == [] and result["id_goal_met"], (figures, slopes)
    for ci in [*(result["intervals"][k] for k in ("expr_ratio", "id_ratio", "bg_l1_ref_vs_expr")),
               result["controls"]["expr_untrained"]]:  # two-way bootstrap intervals around each ratio
        assert ci["low"] <= ci["ratio"] <= ci["high"] and ci["low"] < ci["high"], ci
    assert [result["intervals"][k]["ratio"] for k in ("expr_ratio", "id_ratio", "bg_l1_ref_vs_expr")] == [
        result["expr_ratio"], result["id_ratio"], result["bg_l1_ref_vs_expr"]]
    jaw = result["components"]["jaw.0"]
    assert set(jaw) == set(result["methods"]) and all(-1 <= v["corr"] <= 1 and v["mae"] > 0 for v in jaw.values())
    assert "expr_adapter / arc2face expression error" in res.stdout
    # --check (the trained adapters and the generations are reused): exit 1 exactly when a goal is missed
    again = subprocess.run([*command, *SCALE, "--check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5400)
    met = [result[k] for k in ("expr_goal_met", "id_goal_met", "ref_goal_met")]
    assert again.returncode == (0 if all(met) else 1), again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("misses it, as it must") == 2
    assert again.stdout.count("NOT met") == met.count(False) and "reusing" in again.stdout

    # the scale route: calibrate on val (one scale here, so the test run below reuses the images above), then a test
    # run without --expr-scale reads and records it; calibrations made with another split or adapter are refused
    def closed_loop(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *flags], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5400)

    cal = closed_loop("--split", "val", "--calibrate", SCALE[1])
    assert cal.returncode == 0 and f"chosen on val: scale {SCALE[1]} " in cal.stdout, cal.stdout[-3000:] + cal.stderr
    calibration = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert (calibration["split"], calibration["expr_scale"], set(calibration["scales"])) == ("val", SCALE_VALUE,
                                                                                          {SCALE[1]})
    assert calibration["sources"] == 6 and calibration["targets"] == 6  # the validation subjects' faces, not test's
    assert calibration["ceiling"]["expr_ratio"]["ratio"] < CEILING_BELOW, calibration["ceiling"]
    tested = closed_loop()
    assert tested.returncode == 0, tested.stdout[-3000:] + tested.stderr[-3000:]
    recorded = json.loads((tmp_path / "out" / "closed_loop.json").read_text())
    assert recorded["scale_from"].startswith("calibration on val") and recorded["calibration"] == calibration
    assert recorded["expr_ratio"] == result["expr_ratio"]  # the same images, read back from the cache
    for key, value in (("split", "test"), ("expr_adapter", "0" * 16)):
        bad = tmp_path / f"calibration-{key}.json"
        bad.write_text(json.dumps({**calibration, key: value}))
        refused = closed_loop("--calibration", str(bad))
        assert refused.returncode != 0 and f"{key}: made with {value!r}, this run has" in refused.stderr, refused.stderr
    missing = closed_loop("--calibration", str(tmp_path / "none.json"))
    assert missing.returncode != 0 and "--split val --calibrate" in missing.stderr, missing.stderr
    assert closed_loop("--calibrate").returncode == 2  # never on the test split
