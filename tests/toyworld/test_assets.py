"""``python -m blendexp.toyworld.assets --quick``: every toy asset in its real format, real (small) quality, cached."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds

from blendexp.data.datamodule import tar_members
from blendexp.toyworld import assets
from blendexp.toyworld.assets import ARCFACE, SMIRK, STEPS, TOY_ID_MODEL, QUICK, AssetsConfig, Step, build
from blendexp.toyworld.params import identity_rng, sample_identity
from tests.conftest import missed_thresholds, run_cli

FILES = [ARCFACE, SMIRK, "renders/train.npz", "renders/heldout.npz", "vae/config.json",
         "vae/diffusion_pytorch_model.safetensors", "shards/train-000000.tar", "shards/val-000000.tar", "clips/clips-000000.tar",
         "init/models/arc2face/config.json", "init/stable-diffusion-v1-5/vae/config.json",
         "base/models/arc2face/diffusion_pytorch_model.safetensors", "base/models/encoder/model.safetensors",
         "base/stable-diffusion-v1-5/vae/config.json", "base/stable-diffusion-v1-5/tokenizer/vocab.json",
         "base/stable-diffusion-v1-5/scheduler/scheduler_config.json", "base_samples.png", "metrics.json", "README.md"]


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A --quick build in a fresh root, run as users run it (minutes: each measured build's wall time is in
    tests/margins/quick_build.json)."""
    root = tmp_path_factory.mktemp("toy")
    res = run_cli("blendexp.toyworld.assets", "--root", str(root), "--quick", timeout=4500)  # >= 3x 1422 s (fresh clone)
    assert res.returncode == 0, res.stderr[-4000:]
    return root, res


@pytest.mark.slow
def test_quick_build_writes_every_asset_in_the_real_formats(quick_build) -> None:
    from diffusers import AutoencoderKL

    from blendexp.data.format import decode_sample, vae_latents
    from blendexp.faces.expression import SMIRK_PREFIX, load_smirk
    from blendexp.faces.identity import ArcFaceONNX
    from blendexp.models.arc2face import Arc2FaceBase

    root, res = quick_build
    assert [f for f in FILES if not (root / f).is_file()] == []
    for step in STEPS:
        assert f"{step.name:<11} built" in res.stdout
    arcface = ArcFaceONNX(root / ARCFACE)  # insightface's loader: 1x3x112x112 -> 512
    assert arcface.embed(np.zeros((2, 112, 112, 3), np.uint8)).shape == (2, 512)
    keys = torch.load(root / SMIRK, map_location="cpu", weights_only=True)
    assert all(k.startswith(SMIRK_PREFIX) for k in keys)  # SMIRK_em1.pt's key layout
    assert load_smirk(root / SMIRK)(torch.zeros(1, 3, 224, 224)).shape == (1, 55)
    metrics = json.loads((root / "metrics.json").read_text())
    vae = AutoencoderKL.from_pretrained(root / "vae")
    assert vae.config.latent_channels == QUICK.vae.latent_channels == 16  # SD3's channel count
    assert len(vae.config.block_out_channels) == 4  # SD's 8x downsampling
    assert vae.config.scaling_factor == pytest.approx(metrics["vae"]["scaling_factor"]) != 0.18215
    base = Arc2FaceBase.from_pretrained(str(root / "base/models"), str(root / "base/stable-diffusion-v1-5"))
    assert base.vae.config.scaling_factor == vae.config.scaling_factor  # the base was trained on the toy VAE
    trained = base.unet.state_dict()
    init = Arc2FaceBase.from_pretrained(str(root / "init/models"), str(root / "init/stable-diffusion-v1-5"))
    assert any(not torch.equal(v, trained[k]) for k, v in init.unet.state_dict().items())
    raw = next(iter(wds.WebDataset(str(root / "shards/train-000000.tar"), shardshuffle=False)))
    sample = decode_sample(raw)
    assert sample.meta["id_model"] == TOY_ID_MODEL and sample.image.shape == (64, 64, 3)
    assert np.linalg.norm(sample.id_emb) == pytest.approx(1.0, abs=1e-5)
    # cached latents: the toy VAE's posterior mean of the face (computed before JPEG, so close, not equal, to the
    # latents of the stored JPEG), so training the base never encodes pixels
    again = vae_latents(vae, sample.image[None])[0]
    assert sample.latents.shape == again.shape == (16, 8, 8)
    assert np.corrcoef(sample.latents.ravel(), again.ravel())[0, 1] > 0.99
    frames = [decode_sample(r) for r in wds.WebDataset(str(root / "clips/clips-000000.tar"), shardshuffle=False)]
    assert all(f.latents is not None and f.latents.shape == (16, 8, 8) for f in frames)
    first = [f for f in frames if f.subject == frames[0].subject]
    assert len(first) == 8 and len({f.clip for f in first}) == 1 and [f.meta["frame"] for f in first] == list(range(8))
    edge = lambda f: np.concatenate([f.image[:4].reshape(-1, 3), f.image[-4:].reshape(-1, 3)]).astype(float)
    assert np.abs(edge(first[0]) - edge(first[-1])).mean() < 0.5 * np.abs(edge(first[0]) - edge(frames[-1])).mean()
    for key in ("identity_encoder", "expression_encoder", "vae", "base", "timings"):
        assert key in metrics


# The quick build (60 identities; 60/500/400 steps for recogniser/expression encoder/VAE) against trivial baselines:
# chance is 0.5 for the recogniser's AUC and accuracy (one that saw only hair colour would sit near 0.7); the mean
# predictor, the best constant, for the expression encoder, which must beat it clearly on the jaw opening, the largest
# change in the image and the first it learns (at 500 steps it has only begun to read it); the mean face (blurry,
# right on average, ~13 dB) for the VAE. Each threshold keeps a margin to the worst build measured over seeds and
# native/AVX2-capped kernels (tests/margins/quick_build.json, ``python scripts/measure_margins.py quick-build``): the
# outcome of a short training differs between CPUs as between seeds. The jaw threshold was 0.8: the same seed-0 build
# read the jaw at 0.67x the mean predictor's error on an Intel Xeon and at 0.83x on an AMD EPYC (issue #25), so it is
# 0.9, more than the policy's 0.05 beyond the worst build seen. With the d31590f renderer (larger smile and eye
# changes compete with the jaw) 300 encoder steps read the jaw at 0.94x on seed 0, so the quick build trains 500.
# With the 1.2x larger eyes (6798845) the jaw reads at 0.59-0.80x over seeds 0-1 x native/AVX2 (worst 0.797).
THRESHOLDS = {
    "identity.roc_auc": (">", 0.8),
    "identity.roc_auc_64px": (">", 0.8),
    "identity.verification_accuracy": (">", 0.7),
    "expression.jaw_open_vs_mean_predictor": ("<", 0.9),
    "vae.psnr_gain_db": (">", 2.5),
}


def quick_build_figures(metrics: dict[str, Any]) -> dict[str, float]:
    """The thresholded figures of a build's metrics.json (also read by scripts/measure_margins.py)."""
    ident, exp, vae = metrics["identity_encoder"], metrics["expression_encoder"], metrics["vae"]
    jaw_mae, jaw_mean = exp["per_component_mae_vs_mean_predictor"]["jaw.0 (jaw_open)"]
    return {"identity.roc_auc": ident["roc_auc"], "identity.roc_auc_64px": ident["roc_auc_64px"],
            "identity.verification_accuracy": ident["verification_accuracy"],
            "expression.jaw_open_vs_mean_predictor": jaw_mae / jaw_mean,
            "vae.psnr_gain_db": vae["psnr"] - vae["mean_image_psnr"]}


def measure_figures(seed: int, work: Path) -> dict[str, float]:
    """A quick build with ``--seed`` in ``work`` (scripts/measure_margins.py)."""
    res = run_cli("blendexp.toyworld.assets", "--root", str(work / "toy"), "--quick", "--seed", str(seed), timeout=7200)
    assert res.returncode == 0, res.stderr[-4000:]
    return quick_build_figures(json.loads((work / "toy" / "metrics.json").read_text()))


@pytest.mark.slow
def test_quick_build_beats_trivial_baselines(quick_build) -> None:
    m = json.loads((quick_build[0] / "metrics.json").read_text())
    assert missed_thresholds(quick_build_figures(m), THRESHOLDS) == []
    exp = m["expression_encoder"]
    # its error on VAE round trips is reported for every component
    assert len(exp["per_component_mae_vs_mean_predictor_decoded"]) == len(exp["per_component_mae_vs_mean_predictor"])
    assert exp["mae_decoded"] > 0
    # The quick base trains for a few steps only: its ID score is reported, not required to beat chance here.
    assert -1 <= m["base"]["id_sim_random"] <= 1 and m["base"]["identities"] == 6


@pytest.mark.slow
def test_second_run_skips_every_step_and_touches_nothing(quick_build) -> None:
    root, _ = quick_build
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    res = run_cli("blendexp.toyworld.assets", "--root", str(root), "--quick")
    assert res.returncode == 0, res.stderr[-3000:]
    for step in STEPS:
        assert f"{step.name:<11} skipped" in res.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def _fake_steps(calls: list[str], fail: str | None = None) -> tuple[Step, ...]:
    """Three cheap steps a → b → c that record their runs; ``fail`` raises inside that step."""

    def make(name: str) -> Any:
        def run(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} failed")
            (root / name).write_text(name)
            return {}
        return run

    return (Step("a", make("a"), (), ("a",), lambda c: c.seed), Step("b", make("b"), ("a",), ("b",), lambda c: 0),
            Step("c", make("c"), ("b",), ("c",), lambda c: c.image_size))


def test_cache_rebuilds_changed_steps_their_dependents_and_interrupted_ones(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(assets, "write_report", lambda *a: None)
    monkeypatch.setattr(assets, "STEPS", _fake_steps(calls))
    cfg = AssetsConfig()
    build(tmp_path, cfg)
    build(tmp_path, cfg)
    assert calls == ["a", "b", "c"]  # second run: all cached
    build(tmp_path, AssetsConfig(image_size=32))
    assert calls[3:] == ["c"]  # only the step whose settings changed
    build(tmp_path, AssetsConfig(seed=1, image_size=32))
    assert calls[4:] == ["a", "b", "c"]  # a changed, so everything built on it too
    build(tmp_path, AssetsConfig(seed=1, image_size=32), force=True)
    assert calls[7:] == ["a", "b", "c"]
    monkeypatch.setattr(assets, "STEPS", _fake_steps(calls, fail="b"))
    with pytest.raises(RuntimeError, match="b failed"):
        build(tmp_path, AssetsConfig(seed=2))
    assert calls[10:] == ["a", "b"]
    assert not (tmp_path / "b").exists()  # a failed step leaves no half-written output behind ...
    monkeypatch.setattr(assets, "STEPS", _fake_steps(calls))
    build(tmp_path, AssetsConfig(seed=2))
    assert calls[12:] == ["b", "c"]  # ... and no marker, so the next run redoes it (a was finished)


@pytest.mark.parametrize("cfg", [assets.FULL, QUICK], ids=["full", "quick"])
def test_no_two_uses_of_the_toy_world_share_an_identity(cfg: AssetsConfig) -> None:
    # Enumerates the people themselves, not their seeds: numpy ignores trailing zeros of a seed list, so the streams'
    # old keys (seed, stream, subject) drew annotator_heldout's subject 0 as the base's training subject 2.
    from tests.toyworld.test_shipped import FRESH_STREAM

    uses = {name: [(stream, s) for s in subjects] for name, (stream, subjects) in assets.identity_uses(cfg).items()}
    val = uses.pop("val_stills")  # the closed loop's splits: its first half validates, its second is the test
    uses |= {"closed_loop_val": val[:len(val) // 2], "closed_loop_test": val[len(val) // 2:],
             "shipped_remeasurement": [(FRESH_STREAM, s) for s in range(40)]}
    people = {name: {sample_identity(identity_rng(cfg.seed, stream, s)).to_vector().tobytes() for stream, s in keys}
              for name, keys in uses.items()}
    assert all(len(people[name]) == len(keys) for name, keys in uses.items())  # nobody drawn twice within a use
    shared = {(a, b): len(people[a] & people[b]) for a in people for b in people if a < b}
    assert all(n == 0 for n in shared.values()), {k: n for k, n in shared.items() if n}
    assert min(map(len, people.values())) > 0


def test_data_only_writes_the_shipped_models_data_and_refuses_other_settings(tmp_path: Path) -> None:
    # The closed loop's route without the hour-long build: the shipped recogniser embeds freshly rendered shards.
    from blendexp.data.format import decode_sample

    shipped = tmp_path / "shipped"
    arcface = shipped / assets.SHIPPED_ARCFACE
    arcface.parent.mkdir(parents=True)
    shutil.copy2(assets.SHIPPED_ROOT / assets.SHIPPED_ARCFACE, arcface)
    shutil.copytree(assets.SHIPPED_ROOT / assets.SHIPPED_VAE, shipped / assets.SHIPPED_VAE)
    metrics = json.loads((assets.SHIPPED_ROOT / "metrics.json").read_text())
    (shipped / "metrics.json").write_text(json.dumps({**metrics, "config": asdict(QUICK)}))
    written = assets.shipped_data(tmp_path / "root", QUICK, shipped)
    assert written == {"shards": {"train": 24 * 4, "val": 4 * 4}, "clips": {"frames": 8 * 8}}
    samples = [decode_sample(r) for r in wds.WebDataset(str(tmp_path / "root/shards/val-000000.tar"),
                                                        shardshuffle=False)]
    assert [s.subject for s in samples[::4]] == [f"s{n:05d}" for n in assets.identity_uses(QUICK)["val_stills"][1]]
    embedded = assets.toy_embedder(arcface)(np.stack([s.image for s in samples]))
    cosines = np.stack([s.id_emb for s in samples]) @ embedded.T  # stored ids vs the shipped recogniser's
    own = np.diag(cosines)  # the faces were embedded before JPEG encoding: 0.89 at worst on the full build's val
    others = [cosines[i, j] for i, a in enumerate(samples) for j, b in enumerate(samples) if a.subject != b.subject]
    assert own.min() > 0.8 and own.min() > max(others), (own, max(others))
    assert all(s.latents is not None and s.latents.shape == (16, 8, 8) for s in samples)  # the shipped VAE's
    # More training stills of the same people: a superset of the build's, validation byte for byte the same.
    more = assets.shipped_data(tmp_path / "more", QUICK, shipped, train_per_subject=6)
    assert more == {"shards": {"train": 24 * 6, "val": 4 * 4}, "clips": {"frames": 8 * 8}}
    root, bigger = ({name: data for shard in sorted((tmp_path / folder / "shards").glob("*.tar"))
                     for name, data in tar_members(shard)} for folder in ("root", "more"))
    assert root.items() <= bigger.items() and len(bigger) == 5 * (24 * 6 + 4 * 4)  # five files per sample
    (tmp_path / "not-a-root").write_text("")  # were the flag not refused, the full build would fail here at once
    misuse = run_cli("blendexp.toyworld.assets", "--root", str(tmp_path / "not-a-root"), "--train-per-subject", "32")
    assert misuse.returncode == 2 and "--train-per-subject needs --data-only" in misuse.stderr, misuse.stderr
    with pytest.raises(ValueError, match="seed: shipped build 0, this run 1"):
        assets.shipped_data(tmp_path / "other", replace(QUICK, seed=1), shipped)
    res = run_cli("blendexp.toyworld.assets", "--root", str(tmp_path / "cli"), "--data-only", "--seed", "1")
    assert res.returncode == 1 and "run the full build instead" in res.stderr
    assert not (tmp_path / "cli" / "shards").exists()
