"""Every trained toy asset in one deterministic, cached command: ``python -m blendexp.toyworld.assets``.

Steps, each cached under ``--root`` with a marker that holds the fingerprint of its settings and inputs (a finished
step with an unchanged fingerprint is skipped; ``--force`` rebuilds everything):

  renders     toy faces with random expressions and photo conditions (annotator training + held-out identities)
  identity    toy recogniser (margin softmax) → annotators/antelopev2/arcface.onnx (insightface's signature)
  vae         small AutoencoderKL (8x, 16 channels, scaling_factor = 1/std of its latents) → vae/
  expression  SMIRK-architecture encoder, trained on renders and their VAE round trips → annotators/smirk/SMIRK_em1.pt
  shards      64 px toy stills: id.npy from the toy recogniser, latents.npy from the VAE → shards/{train,val}-*.tar
  clips       64 px frames of one talking-head clip per further subject, same embeddings → clips/clips-*.tar
  init        tiny random Arc2Face base with the toy VAE, official layout → init/
  base        ``python -m blendexp.train +experiment=toy_base`` → base/{models,stable-diffusion-v1-5} (+ runs/base)

Each step measures its asset on held-out identities against a trivial baseline; ``metrics.json`` and a README
describing the build are written to the root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from blendexp.config import CONF_DIR, REPO_ROOT
from blendexp.toyworld.recipes import BaseTraining, ExpressionTraining, IdentityTraining, VaeTraining
from blendexp.toyworld.params import identity_rng, sample_expression, sample_identity, sample_nuisance
from blendexp.toyworld.render import render_face

log = logging.getLogger(__name__)

DEFAULT_ROOT = REPO_ROOT / ".cache" / "toy"
ARCFACE = Path("annotators/antelopev2/arcface.onnx")
SMIRK = Path("annotators/smirk/SMIRK_em1.pt")
TOY_ID_MODEL = "toyworld-toyfacenet-arcface-onnx"


@dataclass(frozen=True)
class AssetsConfig:
    """Sizes of every step; ``FULL`` is the documented build, ``QUICK`` the test-sized one."""

    seed: int = 0
    render_size: int = 128
    nuisance: float = 1.0  # photo-condition strength of annotator renders (shards use 0.5)
    train_subjects: int = 400
    train_per_subject: int = 16
    heldout_subjects: int = 48
    heldout_per_subject: int = 8
    identity: IdentityTraining = IdentityTraining()
    expression: ExpressionTraining = ExpressionTraining()
    vae: VaeTraining = VaeTraining()
    image_size: int = 64  # shards and the base
    shard_subjects: int = 1000
    shard_per_subject: int = 8
    val_shard_subjects: int = 16
    per_shard: int = 1000
    clip_subjects: int = 250  # one clip each, for the Reference Adapter
    clip_frames: int = 16
    base: BaseTraining = field(default_factory=BaseTraining)


FULL = AssetsConfig()
QUICK = AssetsConfig(
    train_subjects=60, train_per_subject=8, heldout_subjects=12, heldout_per_subject=4,
    identity=IdentityTraining(steps=60, batch_size=32),
    expression=ExpressionTraining(steps=500, batch_size=16, decoded_p=0.2, blur_p=0.1),
    vae=VaeTraining(steps=400, width=16), shard_subjects=24, shard_per_subject=4, val_shard_subjects=4, per_shard=48,
    clip_subjects=8, clip_frames=8,
    base=BaseTraining(steps=20, batch_size=8, eval_identities=6, eval_samples=1, eval_steps=4),
)


# ------------------------------------------------------------------------------------------------- renders
def render_set(seed: int, stream: str, subjects: range, per_subject: int, size: int,
               nuisance: float) -> dict[str, np.ndarray]:  # fmt: skip
    """``per_subject`` random-expression, random-condition faces per subject of an identity stream (one of
    ``IDENTITY_STREAMS``): images, labels, (55,) expressions."""
    images, labels, expressions = [], [], []
    for subject in tqdm(subjects, desc="toy renders", unit="subject"):
        rng = identity_rng(seed, stream, subject)
        identity = sample_identity(rng)
        for _ in range(per_subject):
            exp = sample_expression(rng)
            images.append(np.asarray(render_face(identity, exp, sample_nuisance(rng, nuisance), size)))
            labels.append(subject)
            expressions.append(exp)
    return {"images": np.stack(images), "labels": np.asarray(labels), "expressions": np.stack(expressions)}


def identity_uses(cfg: AssetsConfig) -> dict[str, tuple[str, range]]:
    """The identity stream and subjects of each use of the build, the one place its steps take them from (tests
    assert that no two uses share a person)."""
    n, val = cfg.shard_subjects, cfg.val_shard_subjects
    return {"annotator_train": ("annotator_train", range(cfg.train_subjects)),
            "annotator_heldout": ("annotator_heldout", range(cfg.heldout_subjects)),
            "train_stills": ("stills", range(n)), "val_stills": ("stills", range(n, n + val)),
            "clips": ("stills", range(n + val, n + val + cfg.clip_subjects))}


def load_renders(root: Path, split: str) -> dict[str, np.ndarray]:
    """Arrays of ``renders/<split>.npz`` (written by the renders step)."""
    with np.load(root / "renders" / f"{split}.npz") as data:
        return {k: data[k] for k in data.files}


def _renders(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
    """Render the annotator training set and the held-out identities every metric is measured on."""
    (root / "renders").mkdir(parents=True, exist_ok=True)
    uses = identity_uses(cfg)
    for split, per in (("train", cfg.train_per_subject), ("heldout", cfg.heldout_per_subject)):
        np.savez_compressed(root / "renders" / f"{split}.npz",
                            **render_set(cfg.seed, *uses[f"annotator_{split}"], per, cfg.render_size, cfg.nuisance))
    return {"train_images": cfg.train_subjects * cfg.train_per_subject,
            "heldout_images": cfg.heldout_subjects * cfg.heldout_per_subject, "size": cfg.render_size}


# ------------------------------------------------------------------------------------------------- annotators
def _identity(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
    """Train the recogniser, export it as arcface.onnx and measure it through insightface's loader."""
    from blendexp.faces.identity import ArcFaceONNX, export_arcface_onnx
    from blendexp.toyworld.annotators import identity_metrics, train_identity_encoder

    train = load_renders(root, "train")
    net = train_identity_encoder(train["images"], train["labels"], cfg.identity, cfg.seed)
    path = export_arcface_onnx(net, root / ARCFACE)
    held = load_renders(root, "heldout")
    return identity_metrics(ArcFaceONNX(path), held["images"], held["labels"])


def decoded(vae_dir: Path, splits: tuple[np.ndarray, ...], size: int) -> tuple[np.ndarray, ...]:
    """Each stack of ``splits`` shrunk to ``size`` px and passed through the trained toy VAE (round trip, posterior
    mean); the VAE is loaded once for all."""
    from diffusers import AutoencoderKL

    from blendexp.toyworld.annotators import shrink_all
    from blendexp.toyworld.autoencoder import round_trip

    vae = AutoencoderKL.from_pretrained(vae_dir)
    return tuple(round_trip(vae, shrink_all(images, size)) for images in splits)


def _vae(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
    """Train the VAE on 64 px faces, set its latent scaling and measure reconstruction on held-out faces."""
    from diffusers import AutoencoderKL

    from blendexp.toyworld.annotators import shrink_all
    from blendexp.toyworld.autoencoder import set_scaling_factor, train_vae, vae_metrics

    train = shrink_all(load_renders(root, "train")["images"], cfg.image_size)
    vae = train_vae(train, cfg.vae, cfg.seed)
    set_scaling_factor(vae, train, cfg.seed)
    vae.save_pretrained(root / "vae")
    held = shrink_all(load_renders(root, "heldout")["images"], cfg.image_size)
    return vae_metrics(AutoencoderKL.from_pretrained(root / "vae"), held, train.astype(np.float64).mean(0))


def _expression(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
    """Train the SMIRK-architecture encoder on renders and their VAE round trips, save SMIRK_em1.pt and measure it
    as ``load_smirk`` returns it."""
    from blendexp.faces.expression import load_smirk, save_smirk_checkpoint
    from blendexp.toyworld.annotators import expression_metrics, train_expression_encoder

    train, held = load_renders(root, "train"), load_renders(root, "heldout")
    train_decoded, held_decoded = decoded(root / "vae", (train["images"], held["images"]), cfg.image_size)
    model = train_expression_encoder(train["images"], train_decoded, train["expressions"], cfg.expression, cfg.seed)
    path = save_smirk_checkpoint(model, root / SMIRK)
    return expression_metrics(load_smirk(path), held["images"], held_decoded, held["expressions"],
                              train["expressions"].mean(0))


# ------------------------------------------------------------------------------------------------- base
def _shards(root: Path, cfg: AssetsConfig, arcface: Path = ARCFACE, vae: Path = Path("vae"),
            train_per_subject: int | None = None) -> dict[str, Any]:
    """Write the base's training data: toy stills whose id.npy are the toy recogniser's embeddings and whose
    latents.npy are the toy VAE's (training then never encodes pixels). ``train_per_subject`` (default the build's
    ``shard_per_subject``) draws more training stills of the same people; a subject's first draws stay the same."""
    from diffusers import AutoencoderKL

    from blendexp.toyworld.shards import write_split

    uses = identity_uses(cfg)
    per_subject = {"train": train_per_subject or cfg.shard_per_subject, "val": cfg.shard_per_subject}
    common = dict(size=cfg.image_size, seed=cfg.seed, per_shard=cfg.per_shard, embed=toy_embedder(root / arcface),
                  id_model=TOY_ID_MODEL, vae=AutoencoderKL.from_pretrained(root / vae).eval())
    return {split: write_split(root / "shards", split, uses[f"{split}_stills"][1], per_subject=n, **common)
            for split, n in per_subject.items()}


def _clips(root: Path, cfg: AssetsConfig, arcface: Path = ARCFACE, vae: Path = Path("vae")) -> dict[str, Any]:
    """One talking-head clip for each of further subjects: the Reference Adapter's (reference, target) pairs."""
    from diffusers import AutoencoderKL

    from blendexp.toyworld.shards import write_split

    return {"frames": write_split(root / "clips", "clips", identity_uses(cfg)["clips"][1],
                                  per_subject=cfg.clip_frames, size=cfg.image_size, seed=cfg.seed,
                                  per_shard=cfg.per_shard, embed=toy_embedder(root / arcface), id_model=TOY_ID_MODEL,
                                  clips=True, vae=AutoencoderKL.from_pretrained(root / vae).eval())}


def _init(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
    """Write the tiny random base (official layout) and put the trained toy VAE in it: the base's start."""
    from diffusers import AutoencoderKL

    from blendexp.models.tiny import save_tiny_base

    vae = AutoencoderKL.from_pretrained(root / "vae")
    _, sd15 = save_tiny_base(root / "init", cfg.seed, vae.config.latent_channels)
    shutil.rmtree(sd15 / "vae")
    vae.save_pretrained(sd15 / "vae")
    return {}


def _base(root: Path, cfg: AssetsConfig) -> dict[str, Any]:
    """Train the base through the real recipe and entry point, then copy its official-layout export to base/."""
    from blendexp.toyworld.annotators import base_id_similarity

    run_dir = root / "runs" / "base"
    b = cfg.base
    cmd = [sys.executable, "-m", "blendexp.train", "+experiment=toy_base", f"paths.toy_world={root}",
           f"hydra.run.dir={run_dir}", f"seed={cfg.seed}", f"trainer.max_steps={b.steps}",
           f"data.batch_size={b.batch_size}", f"model.optim.lr={b.lr}", *b.overrides]
    log.info("training the toy base: %s", " ".join(cmd))
    res = subprocess.run(cmd, cwd=REPO_ROOT, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"toy base training failed (exit {res.returncode}); command: {' '.join(cmd)}; "
                           f"logs in {run_dir}")
    shutil.copytree(run_dir / "export", root / "base")
    return base_id_similarity(root / "base", root / ARCFACE, load_renders(root, "heldout"), cfg.image_size,
                              b.eval_identities, b.eval_samples, b.eval_steps, b.eval_guidance, cfg.seed,
                              root / "base_samples.png")


# ------------------------------------------------------------------------------------------------- the build
@dataclass(frozen=True)
class Step:
    """One cached asset: what it needs, what it writes (relative to the root) and which settings shape it."""

    name: str
    run: Callable[[Path, AssetsConfig], dict[str, Any]]
    deps: tuple[str, ...]
    outputs: tuple[str, ...]
    settings: Callable[[AssetsConfig], Any]


def _renders_settings(c: AssetsConfig) -> dict[str, Any]:
    """Everything that changes the rendered arrays."""
    return {k: getattr(c, k) for k in ("seed", "render_size", "nuisance", "train_subjects", "train_per_subject",
                                       "heldout_subjects", "heldout_per_subject")}


STEPS = (
    Step("renders", _renders, (), ("renders",), _renders_settings),
    Step("identity", _identity, ("renders",), (str(ARCFACE),), lambda c: (c.seed, asdict(c.identity))),
    Step("vae", _vae, ("renders",), ("vae",), lambda c: (c.seed, c.image_size, asdict(c.vae))),
    Step("expression", _expression, ("renders", "vae"), (str(SMIRK),),
         lambda c: (c.seed, c.image_size, asdict(c.expression))),
    Step("shards", _shards, ("identity", "vae"), ("shards",),
         lambda c: (c.seed, c.image_size, c.shard_subjects, c.shard_per_subject, c.val_shard_subjects, c.per_shard)),
    Step("clips", _clips, ("identity", "vae"), ("clips",),
         lambda c: (c.seed, c.image_size, c.shard_subjects, c.val_shard_subjects, c.clip_subjects, c.clip_frames,
                    c.per_shard)),
    Step("init", _init, ("vae",), ("init",), lambda c: c.seed),
    Step("base", _base, ("shards", "init"), ("runs/base", "base", "base_samples.png"),
         lambda c: (c.seed, c.image_size, asdict(c.base), _recipe_text())),
)


def _recipe_text() -> str:
    """The base recipe's config files: editing them must retrain the base, as changing a setting here does."""
    recipe = ("experiment/toy_base.yaml", "model/arc2face_base.yaml", "base/arc2face.yaml", "optim/adamw.yaml")
    return "".join((CONF_DIR / f).read_text() for f in recipe)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: divided by the cores, the unloaded wall time."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _remove(path: Path) -> None:
    """Delete a previous (possibly partial) output so a rebuilt step starts clean."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def build(root: str | Path = DEFAULT_ROOT, cfg: AssetsConfig = FULL, force: bool = False) -> dict[str, dict[str, Any]]:
    """Build (or reuse) every step in order; returns each step's record with ``status`` built/skipped."""
    root = Path(root).resolve()
    (root / ".done").mkdir(parents=True, exist_ok=True)
    fingerprints: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for step in STEPS:
        text = json.dumps([step.settings(cfg), [fingerprints[d] for d in step.deps]], sort_keys=True, default=str)
        fingerprints[step.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
        marker = root / ".done" / f"{step.name}.json"
        record = json.loads(marker.read_text()) if marker.is_file() else {}
        if not force and record.get("fingerprint") == fingerprints[step.name]:
            log.info("%s: skipped (cached in %s)", step.name, root)
            records[step.name] = {**record, "status": "skipped"}
            continue
        marker.unlink(missing_ok=True)  # written last: an interrupted step is redone
        for out in step.outputs:
            _remove(root / out)
        log.info("%s: building", step.name)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        metrics = step.run(root, cfg)
        record = {"fingerprint": fingerprints[step.name], "wall_s": round(time.perf_counter() - wall, 1),
                  "cpu_s": round(_cpu_seconds() - cpu, 1), "metrics": metrics}
        marker.write_text(json.dumps(record, indent=1))
        records[step.name] = {**record, "status": "built"}
    write_report(root, cfg, records)
    return records


def headline(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Each asset's main score next to its trivial baseline, for the CLI summary and the README."""
    from blendexp.flame import MAPPED_COMPONENTS
    from blendexp.toyworld.annotators import READABLE

    i, e = records["identity"]["metrics"], records["expression"]["metrics"]
    v, b = records["vae"]["metrics"], records["base"]["metrics"]
    return {
        "identity encoder": f"ROC AUC {i['roc_auc']:.3f} (64 px: {i['roc_auc_64px']:.3f}), verification accuracy "
                            f"{i['verification_accuracy']:.3f} — chance 0.5; {i['identities']} held-out identities",
        "expression encoder": f"MAE {e['mae']:.3f} on the mapped components (64 px: {e['mae_64px']:.3f}, VAE round "
                              f"trips: {e['mae_decoded']:.3f}) vs "
                              f"{e['mean_predictor_mae']:.3f} for the mean predictor (ratio {e['mae_ratio']:.2f}); "
                              f"reads {len(e['readable_decoded'])} of {len(MAPPED_COMPONENTS)} on VAE round trips at "
                              f"<= {READABLE}x the mean predictor's error ({', '.join(e['readable_decoded'])})",
        "VAE": f"PSNR {v['psnr']:.1f} dB vs {v['mean_image_psnr']:.1f} dB for the mean image; "
               f"scaling_factor {v['scaling_factor']:.4f}",
        "base": f"ID sim generated↔own identity {b['id_sim_matched']:.3f} vs {b['id_sim_random']:.3f} for other "
                f"identities (AUC {b['id_auc']:.3f}); real photos of one identity {b['real_same_identity_sim']:.3f}",
    }


def _write_if_changed(path: Path, text: str) -> None:
    """Rewrite only on change, so a fully cached run touches nothing."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_report(root: Path, cfg: AssetsConfig, records: dict[str, dict[str, Any]]) -> None:
    """metrics.json (every step's metrics, timings and the config) and a README saying how the assets were made."""
    names = {"renders": "renders", "identity": "identity_encoder", "expression": "expression_encoder", "vae": "vae",
             "shards": "shards", "clips": "clips", "base": "base"}
    timings = {n: {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]} for n, r in records.items()}
    metrics = {names[n]: records[n]["metrics"] for n in names}
    metrics.update(timings=timings, total_wall_s=round(sum(t["wall_s"] for t in timings.values()), 1),
                   total_cpu_s=round(sum(t["cpu_s"] for t in timings.values()), 1), config=asdict(cfg))
    _write_if_changed(root / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    quick = " --quick" if cfg == replace(QUICK, seed=cfg.seed) else ""
    where = "" if root == DEFAULT_ROOT.resolve() else f" --root {root}"
    lines = [f"# Toy-world assets\n\nMade by `python -m blendexp.toyworld.assets{where}{quick} --seed {cfg.seed}`"
             " (deterministic; cached steps are skipped, `--force` rebuilds). Settings: `config` in metrics.json.\n",
             "| path | what | how |", "| --- | --- | --- |",
             f"| renders/{{train,heldout}}.npz | {cfg.train_subjects}x{cfg.train_per_subject} training and "
             f"{cfg.heldout_subjects}x{cfg.heldout_per_subject} held-out faces, {cfg.render_size} px | random "
             f"identity, expression and photo conditions (strength {cfg.nuisance}) per face |",
             f"| {ARCFACE} | identity encoder (ToyFaceNet, 1x3x112x112 → 512) | CosFace margin softmax, "
             f"{cfg.identity.steps} steps x {cfg.identity.batch_size}; ArcFace crops of aligned faces |",
             f"| {SMIRK} | expression encoder (SMIRK's MobileNetV3 + Linear(960, 55)) | range-scaled MSE on the "
             f"55 values, {cfg.expression.steps} steps x {cfg.expression.batch_size}; SMIRK crops of renders, 64 px, "
             "blurred and VAE round-trip faces |",
             f"| vae/ | AutoencoderKL (8x, {cfg.vae.latent_channels} latent channels) | MSE + KL, {cfg.vae.steps} "
             f"steps x {cfg.vae.batch_size} at {cfg.image_size} px; scaling_factor = 1/std of its latents |",
             f"| shards/ | {cfg.shard_subjects}x{cfg.shard_per_subject} train, {cfg.val_shard_subjects}x"
             f"{cfg.shard_per_subject} val stills, {cfg.image_size} px | id.npy from the toy identity encoder, "
             "exp.npy ground truth, latents.npy from vae/ |",
             f"| clips/ | one {cfg.clip_frames}-frame clip for each of {cfg.clip_subjects} further subjects, "
             f"{cfg.image_size} px | talking-head clips (one background, drifting pose and light), embedded the same "
             "way; the Reference Adapter's pairs |",
             "| init/ | tiny random Arc2Face base + toy VAE, official layout | `blendexp.models.tiny` |",
             f"| base/ | trained toy Arc2Face base (models/, stable-diffusion-v1-5/) | `python -m blendexp.train "
             f"+experiment=toy_base`, {cfg.base.steps} steps x {cfg.base.batch_size}; run in runs/base/ |",
             "\nAll scores are on held-out identities; base_samples.png shows each held-out face (left) and "
             "what the base draws for its embedding.\n"]
    lines += [f"- **{k}**: {v}" for k, v in headline(records).items()]
    lines += ["", "Timings (wall / CPU seconds; the build was made for 2 CPU cores):", ""]
    lines += [f"- {n}: {t['wall_s']} / {t['cpu_s']}" for n, t in timings.items()]
    _write_if_changed(root / "README.md", "\n".join(lines) + "\n")


SHIPPED_ROOT = REPO_ROOT / "data" / "toy"
# what the repository carries, laid out as one official models folder + SD 1.5 folder: shipped path -> build path
SHIPPED_ARCFACE, SHIPPED_VAE = Path("models/antelopev2/arcface.onnx"), Path("stable-diffusion-v1-5/vae")
SHIPPED = {"models/arc2face": "base/models/arc2face", "models/encoder": "base/models/encoder",
           str(SHIPPED_ARCFACE): str(ARCFACE), "models/smirk/SMIRK_em1.pt": str(SMIRK),
           "stable-diffusion-v1-5": "base/stable-diffusion-v1-5", "metrics.json": "metrics.json",
           "README.md": "README.md"}


def ship(root: Path, dest: Path = SHIPPED_ROOT) -> Path:
    """Copy the trained annotators, the toy base and the build's report (about 28 MB) to ``dest`` in the official
    layout (``models/{arc2face,encoder,antelopev2,smirk}``, ``stable-diffusion-v1-5/``): the copy the repository
    carries, so entry points, tests and benchmarks use trained toy models without the hour-long build."""
    missing = [str(root / f) for f in SHIPPED.values() if not (root / f).exists()]
    if missing:
        raise FileNotFoundError(f"cannot ship an incomplete build; missing: {', '.join(missing)}")
    if dest.exists():
        shutil.rmtree(dest)
    for rel, src in SHIPPED.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (root / src).is_dir() else shutil.copy2
        copy(root / src, dest / rel)
    note = ("The repository's copy of a full build, laid out as an official models folder (`models/`: arc2face, "
            "encoder, antelopev2/arcface.onnx, smirk/SMIRK_em1.pt) and SD 1.5 folder (`stable-diffusion-v1-5/`), "
            "made with `python -m blendexp.toyworld.assets --ship`; the build's report follows (its paths are the "
            "build root's). Renders, shards and clips are not shipped: the build remakes them in a minute.\n\n")
    readme = (dest / "README.md").read_text()
    (dest / "README.md").write_text(readme.replace("\n\n", "\n\n" + note, 1))
    return dest


DATA_SETTINGS = ("seed", "image_size", "shard_subjects", "shard_per_subject", "val_shard_subjects", "per_shard",
                 "clip_subjects", "clip_frames")  # what shapes shards/ and clips/ besides the recogniser


def shipped_data(root: Path, cfg: AssetsConfig = FULL, shipped: Path = SHIPPED_ROOT,
                 train_per_subject: int | None = None) -> dict[str, Any]:
    """Write shards/ and clips/ under ``root``, ids embedded by the shipped recogniser: the data the shipped models
    were trained and are evaluated on (benchmarks/closed_loop.py), in a minute instead of the hour-long build;
    ``train_per_subject`` adds training stills of the same people (validation and clips stay the same)."""
    made = json.loads((shipped / "metrics.json").read_text())["config"]
    wrong = [f"{k}: shipped build {made.get(k)!r}, this run {getattr(cfg, k)!r}" for k in DATA_SETTINGS
             if made.get(k) != getattr(cfg, k)]
    if wrong:
        raise ValueError(f"{shipped} was built with other data settings ({'; '.join(wrong)}); its recogniser would "
                         "embed data it never saw: run the full build instead")
    arcface, vae = (shipped / SHIPPED_ARCFACE).resolve(), (shipped / SHIPPED_VAE).resolve()
    for folder in ("shards", "clips"):
        _remove(root / folder)
    return {"shards": _shards(root, cfg, arcface, vae, train_per_subject), "clips": _clips(root, cfg, arcface, vae)}


def toy_embedder(arcface: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Per-image embeddings from a toy recogniser, cropped as the evaluator crops aligned faces."""
    from blendexp.faces.identity import ArcFaceONNX
    from blendexp.toyworld.annotators import identity_crops

    encoder = ArcFaceONNX(arcface)
    return lambda images: encoder.embed(identity_crops(images))


def main() -> None:
    """CLI: build what is missing, print one line per step and the headline metrics."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"where assets are cached (default {DEFAULT_ROOT})")
    p.add_argument("--quick", action="store_true", help="test-sized build (seconds per step; metrics still real)")
    p.add_argument("--force", action="store_true", help="rebuild every step even if cached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", action="store_true", help=f"then copy annotators, base and report to {SHIPPED_ROOT}")
    p.add_argument("--data-only", action="store_true",
                   help=f"write only shards/ and clips/ under --root, embedded by the recogniser in {SHIPPED_ROOT} "
                        "(the shipped models' data, for benchmarks/closed_loop.py; about a minute)")
    p.add_argument("--train-per-subject", type=int, default=None, metavar="N",
                   help="with --data-only: N training stills per subject instead of the build's "
                        f"{FULL.shard_per_subject} (more expressions of the same people, for adapter trials)")
    args = p.parse_args()
    if args.ship and (args.quick or args.data_only):
        p.error("--ship copies the documented full build into the repository; drop --quick / --data-only")
    if args.train_per_subject is not None and (not args.data_only or args.train_per_subject < 1):
        p.error("--train-per-subject needs --data-only and a positive count")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cfg = replace(QUICK if args.quick else FULL, seed=args.seed)
    try:
        if args.data_only:
            written = shipped_data(args.root.resolve(), cfg, train_per_subject=args.train_per_subject)
            stills = ", ".join(f"{n} {split}" for split, n in written["shards"].items())
            print(f"{args.root.resolve()}: stills {stills}; {written['clips']['frames']} clip frames; ids embedded "
                  f"by {SHIPPED_ROOT}'s recogniser")
            return
        records = build(args.root, cfg, args.force)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    for name, rec in records.items():
        print(f"{name:<11} {rec['status']:<8} wall {rec['wall_s']:>7.1f} s  cpu {rec['cpu_s']:>7.1f} s")
    for name, text in headline(records).items():
        print(f"{name}: {text}")
    print(f"metrics: {args.root.resolve() / 'metrics.json'}")
    if args.ship:
        print(f"shipped: {ship(args.root.resolve())}")


if __name__ == "__main__":
    main()
