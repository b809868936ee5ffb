"""Toy annotators trained on toy renders and shipped in the real formats: an ArcFace-style recogniser and SMIRK.

No face data or pretrained weights are available here, so the identity and expression models every metric and
data builder relies on are trained in the toy world, where identity and expression are known exactly. Inputs are
cropped exactly as the evaluator crops generated (FFHQ-aligned) faces — ``AlignedFaces`` landmarks → ArcFace's
112 px crop, ``AlignedFaces`` box → SMIRK's 224 px crop — so the exported files drop into ``arcface.onnx`` /
``SMIRK_em1.pt`` slots and measure toy faces the way the real ones measure photos.
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from tqdm import tqdm

from blendexp.faces.align import ARCFACE_SIZE
from blendexp.faces.annotators import AlignedFaces
from blendexp.faces.expression import SmirkExpressionEncoder, prepare_smirk_input
from blendexp.faces.identity import IdentityEncoder
from blendexp.flame import COMPONENT_NAMES, EXP_DIM, MAPPED_COMPONENTS
from blendexp.toyworld.autoencoder import to_pixels
from blendexp.toyworld.fitting import fit
from blendexp.toyworld.recipes import ExpressionTraining, IdentityTraining

log = logging.getLogger(__name__)

SMALL_SIZE = 64  # the toy pipeline's image size (shards, generated faces); training mixes it in
MAPPED = np.fromiter(MAPPED_COMPONENTS, dtype=int)
# Per-component loss scale: mapped components by their range, so jaw (+-0.2) counts as much as exp.0 (+-3).
READABLE = 0.5  # a component is read when its MAE on VAE round trips is at most this x the mean predictor's
LOSS_SCALE = np.ones(EXP_DIM, dtype=np.float32)
LOSS_SCALE[MAPPED] = [c.high - c.low for c in MAPPED_COMPONENTS.values()]


# ------------------------------------------------------------------------------------------------- crops
@lru_cache(maxsize=8)
def _arcface_matrix(size: int) -> np.ndarray:
    """The 2x3 warp ``arcface_crop`` computes for an aligned ``size`` px face (the same for every image)."""
    from insightface.utils.face_align import estimate_norm

    face = AlignedFaces().detect(np.zeros((size, size, 3), np.uint8))[0]
    with warnings.catch_warnings():  # insightface calls a scikit-image API deprecated in 0.26
        warnings.simplefilter("ignore", FutureWarning)
        return estimate_norm(face.landmarks5.astype(np.float32), ARCFACE_SIZE)


def identity_crops(images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 aligned faces → (N, 112, 112, 3) ArcFace crops, pixel-identical to the evaluator's."""
    return np.stack([cv2.warpAffine(im, _arcface_matrix(im.shape[0]), (ARCFACE_SIZE, ARCFACE_SIZE), borderValue=0.0)
                     for im in images])


@lru_cache(maxsize=8)
def _smirk_box(size: int) -> np.ndarray:
    """The face box ``AlignedFaces`` reports for a ``size`` px aligned face (SMIRK's crop is built around it)."""
    return AlignedFaces().detect(np.zeros((size, size, 3), np.uint8))[0].bbox


def smirk_inputs(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 aligned faces → (N, 3, 224, 224) SMIRK inputs, cropped as ``SmirkAnnotator`` crops them."""
    return torch.cat([prepare_smirk_input(im, _smirk_box(im.shape[0])) for im in images])


def shrink(image: np.ndarray, size: int = SMALL_SIZE) -> np.ndarray:
    """Area-downsample to ``size`` px: the toy pipeline's resolution, used as augmentation and as a test condition."""
    if image.shape[0] <= size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def shrink_all(images: np.ndarray | list[np.ndarray], size: int = SMALL_SIZE) -> np.ndarray:
    """``shrink`` over a stack of faces, as one (N, size, size, 3) array."""
    return np.stack([shrink(im, size) for im in images])


def _augment(images: np.ndarray, rng: np.random.Generator, small_p: float) -> list[np.ndarray]:
    """Shrink each image to 64 px with probability ``small_p``, so encoders work on renders and 64 px faces alike."""
    return [shrink(im) if rng.random() < small_p else im for im in images]


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` px: augmentation towards the softness of decoded, generated faces."""
    return cv2.GaussianBlur(image, (0, 0), sigma)


def _degrade(images: np.ndarray, decoded: np.ndarray, rng: np.random.Generator, cfg: ExpressionTraining) -> list[np.ndarray]:
    """Per face: its VAE round trip, a blurred 64 px copy, a plain 64 px copy or the sharp render.

    Generated faces come out of the VAE's decoder, so an encoder that only saw sharp renders cannot read them
    (a 1 px blur alone took its eyelid error from 0.22x to 1.75x of the mean predictor's)."""
    out = []
    for im, dec in zip(images, decoded):
        r = rng.random()
        if r < cfg.decoded_p:
            out.append(dec)
        elif r < cfg.decoded_p + cfg.blur_p:
            out.append(blur(shrink(im), rng.uniform(*cfg.blur_sigma)))
        else:
            out.append(shrink(im) if rng.random() < cfg.small_p else im)
    return out


# ------------------------------------------------------------------------------------------------- identity
def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    """3x3 conv + BN + PReLU, the unit of ArcFace's ResNets."""
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]


class ToyFaceNet(nn.Module):
    """A small ArcFace-style recogniser: (N, 3, 112, 112) RGB as (x-127.5)/127.5 → (N, 512), unnormalised."""

    def __init__(self, width: int = 16) -> None:
        """Four stride-2 stages to 7x7, then ArcFace's position-aware head (flatten → FC → BN) keeps the layout."""
        super().__init__()
        c = [width, 2 * width, 4 * width, 8 * width]
        self.body = nn.Sequential(*_conv(3, c[0], 2), *_conv(c[0], c[1], 2), *_conv(c[1], c[1], 1),
                                  *_conv(c[1], c[2], 2), *_conv(c[2], c[2], 1), *_conv(c[2], c[3], 2),
                                  *_conv(c[3], c[3], 1), nn.Conv2d(c[3], 32, 1, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 7 * 7, 512), nn.BatchNorm1d(512))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed normalised crops; callers L2-normalise, as insightface does."""
        return self.head(self.body(x))


def train_identity_encoder(images: np.ndarray, labels: np.ndarray, cfg: IdentityTraining,
                           seed: int) -> ToyFaceNet:  # fmt: skip
    """Fit ToyFaceNet with a margin softmax so same-identity crops cluster whatever the expression and photo."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes, targets = np.unique(labels, return_inverse=True)
    net = ToyFaceNet(cfg.width)
    centres = nn.Parameter(torch.randn(len(classes), 512) * 0.01)  # one class centre per identity
    net.train()

    def step() -> tuple[torch.Tensor, dict[str, str]]:
        """CosFace loss of one random batch."""
        idx = rng.integers(len(images), size=cfg.batch_size)
        x = to_pixels(identity_crops(_augment(images[idx], rng, cfg.small_p)))
        cos = F.normalize(net(x)) @ F.normalize(centres).T  # (B, classes)
        y = torch.from_numpy(targets[idx])
        loss = F.cross_entropy(cfg.scale * (cos - cfg.margin * F.one_hot(y, len(classes))), y)
        return loss, {"loss": f"{loss.item():.3f}"}

    fit([*net.parameters(), centres], cfg.steps, cfg.lr, cfg.weight_decay, 0.1, "identity encoder", step)
    return net.eval()


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability a positive scores above a negative (ties count half): ROC AUC without sklearn."""
    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _balanced_pairs(labels: np.ndarray, people: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """All same-identity pairs among ``people`` plus as many random different-identity pairs (index arrays)."""
    idx = np.flatnonzero(np.isin(labels, people))
    i, j = np.triu_indices(len(idx), 1)
    same = labels[idx[i]] == labels[idx[j]]
    diff = rng.choice(np.flatnonzero(~same), size=min(same.sum(), (~same).sum()), replace=False)
    keep = np.concatenate([np.flatnonzero(same), diff])
    return np.stack([idx[i[keep]], idx[j[keep]]], 1), same[keep]


def verification_metrics(emb: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """ROC AUC over all pairs and balanced verification accuracy (threshold fitted on the other half of the people)."""
    sims = emb @ emb.T
    i, j = np.triu_indices(len(emb), 1)
    same = labels[i] == labels[j]
    rng = np.random.default_rng(seed)
    people = rng.permutation(np.unique(labels))
    halves = np.array_split(people, 2)
    correct = []
    for train_half, test in (halves, halves[::-1]):
        fit_pairs, fit_same = _balanced_pairs(labels, train_half, rng)
        fit_sims = sims[fit_pairs[:, 0], fit_pairs[:, 1]]
        cuts = np.unique(fit_sims)
        candidates = np.concatenate([cuts[:1] - 1e-6, (cuts[:-1] + cuts[1:]) / 2, cuts[-1:] + 1e-6])  # midpoints
        best = candidates[np.argmax([((fit_sims >= t) == fit_same).mean() for t in candidates])]
        test_pairs, test_same = _balanced_pairs(labels, test, rng)
        correct.append((sims[test_pairs[:, 0], test_pairs[:, 1]] >= best) == test_same)
    return {"roc_auc": roc_auc(sims[i, j][same], sims[i, j][~same]),
            "verification_accuracy": float(np.concatenate(correct).mean()),
            "same_identity_sim": float(sims[i, j][same].mean()), "different_identity_sim": float(sims[i, j][~same].mean())}


def identity_metrics(encoder: IdentityEncoder, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Verification on held-out identities at the render size and at 64 px (trivial baseline: 0.5 for both)."""
    out = verification_metrics(encoder.embed(identity_crops(images)), labels)
    small = verification_metrics(encoder.embed(identity_crops(shrink_all(images))), labels)
    out.update({f"{k}_64px": v for k, v in small.items() if k in ("roc_auc", "verification_accuracy")})
    return {**out, "baseline": 0.5, "images": len(images), "identities": len(np.unique(labels))}


# ------------------------------------------------------------------------------------------------- expression
def _raw_flame(model: SmirkExpressionEncoder, x: torch.Tensor) -> torch.Tensor:
    """(N, 55) head outputs before SMIRK's clamps, so training never sits in a clamp's zero-gradient region.

    Clamping at inference can only move a prediction towards the (in-range) truth, so fitting the raw output
    also fits ``model(x)``."""
    return model.expression_layers(F.adaptive_avg_pool2d(model.encoder(x)[-1], 1).flatten(1))


def train_expression_encoder(images: np.ndarray, decoded: np.ndarray, expressions: np.ndarray,
                             cfg: ExpressionTraining, seed: int) -> SmirkExpressionEncoder:  # fmt: skip
    """Fit SMIRK's architecture from scratch to regress the 55 FLAME values the renderer was given, on renders and
    on ``decoded`` (their 64 px VAE round trips) alike."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SmirkExpressionEncoder().to(memory_format=torch.channels_last)  # MobileNetV3 steps 35% faster on CPU
    scale = torch.from_numpy(LOSS_SCALE)
    model.train()

    def step() -> tuple[torch.Tensor, dict[str, str]]:
        """Range-scaled MSE of one random batch (MSE: L1 locks onto the sparse median, 0)."""
        idx = rng.integers(len(images), size=cfg.batch_size)
        x = smirk_inputs(_degrade(images[idx], decoded[idx], rng, cfg)).contiguous(memory_format=torch.channels_last)
        target = torch.from_numpy(expressions[idx])
        loss = F.mse_loss(_raw_flame(model, x) / scale, target / scale)
        return loss, {"loss": f"{loss.item():.4f}"}

    fit(model.parameters(), cfg.steps, cfg.lr, cfg.weight_decay, 0.15, "expression encoder", step)
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def predict_expressions(model: SmirkExpressionEncoder, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """(N, 55) FLAME vectors through SMIRK's own forward (with its output clamps), as the evaluator reads them."""
    model.eval()
    return np.concatenate([model(smirk_inputs(images[s:s + batch_size])).numpy()
                           for s in range(0, len(images), batch_size)])


def expression_metrics(model: SmirkExpressionEncoder, images: np.ndarray, decoded: np.ndarray,
                       expressions: np.ndarray, train_mean: np.ndarray) -> dict[str, float | dict[str, list[float]]]:  # fmt: skip
    """MAE over the mapped components vs. always predicting the training mean: on the renders, at 64 px and on
    ``decoded`` (64 px VAE round trips: how generated faces look at best; ``_decoded`` keys)."""
    truth = expressions[:, MAPPED]
    baseline = np.abs(truth - train_mean[MAPPED]).mean(0)  # (13,)
    out: dict[str, float | dict[str, list[float]]] = {}
    for suffix, imgs in (("", images), ("_64px", shrink_all(images)), ("_decoded", decoded)):
        mae = np.abs(predict_expressions(model, imgs)[:, MAPPED] - truth).mean(0)
        out[f"mae{suffix}"] = float(mae.mean())
        out[f"mae_ratio{suffix}"] = float(mae.mean() / baseline.mean())
        out[f"worst_component_ratio{suffix}"] = float((mae / baseline).max())
        if suffix != "_64px":
            out[f"per_component_mae_vs_mean_predictor{suffix}"] = {
                f"{COMPONENT_NAMES[i]} ({c.name})": [round(float(m), 4), round(float(b), 4)]
                for (i, c), m, b in zip(MAPPED_COMPONENTS.items(), mae, baseline)}
        if suffix == "_decoded":  # what the closed loop scores: generated faces are never sharper than round trips
            out["readable_decoded"] = [COMPONENT_NAMES[i] for i, m, b in zip(MAPPED_COMPONENTS, mae, baseline)
                                       if m <= READABLE * b]
    out["mean_predictor_mae"] = float(baseline.mean())
    out["images"] = len(images)
    return out


# ------------------------------------------------------------------------------------------------- base model
@torch.no_grad()
def base_id_similarity(base_dir: Path, arcface: Path, heldout: dict[str, np.ndarray], size: int, identities: int,
                       samples: int, steps: int, guidance: float, seed: int, grid: Path) -> dict[str, float]:  # fmt: skip
    """How well a trained base draws held-out identities, measured by the toy recogniser that conditioned it.

    Per identity, its first held-out face (at ``size`` px, as in the shards) gives the conditioning embedding; the
    matched score is cos(generated, own condition), the baseline cos(generated, other identities' conditions).
    Two real faces of one identity give the ceiling. ``grid`` shows real faces next to their generations."""
    from diffusers import DPMSolverMultistepScheduler

    from blendexp.faces.identity import ArcFaceONNX
    from blendexp.images import image_grid
    from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
    from blendexp.models.sampling import sample

    labels = heldout["labels"]
    people = np.unique(labels)[:identities]
    first = np.array([np.flatnonzero(labels == p)[0] for p in people])
    faces = [shrink(heldout["images"][i], size) for i in first]
    others = [shrink(heldout["images"][i + 1], size) for i in first]  # a second photo of the same person
    encoder = ArcFaceONNX(arcface)
    cond, real = encoder.embed(identity_crops(faces)), encoder.embed(identity_crops(others))
    base = Arc2FaceBase.from_pretrained(str(base_dir / "models"), str(base_dir / "stable-diffusion-v1-5"))
    pipe = base.pipeline(DPMSolverMultistepScheduler.from_config(base.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    prompt = id_prompt_embeds(base.text_encoder, base.tokenizer, torch.from_numpy(cond))  # (P, 77, D)
    generated = [sample(pipe, prompt, [seed * 100_003 + k * len(people) + i for i in range(len(people))], steps=steps,
                        guidance=guidance, size=size) for k in tqdm(range(samples), desc="base samples", unit="seed")]
    images = np.concatenate(generated)  # (samples * P, size, size, 3), identity i at rows i, P + i, ...
    sims = encoder.embed(identity_crops(images)) @ cond.T  # (samples * P, P)
    own = np.tile(np.arange(len(people)), samples)
    matched = sims[np.arange(len(images)), own]
    mask = np.ones_like(sims, dtype=bool)
    mask[np.arange(len(images)), own] = False
    image_grid([[faces[i], *images[i::len(people)]] for i in range(len(people))]).save(grid)
    real_sims = real @ cond.T
    return {"id_sim_matched": float(matched.mean()), "id_sim_random": float(sims[mask].mean()),
            "id_auc": roc_auc(matched, sims[mask]), "real_same_identity_sim": float(np.diag(real_sims).mean()),
            "real_different_identity_sim": float(real_sims[~np.eye(len(people), dtype=bool)].mean()),
            "identities": len(people), "samples_per_identity": samples, "steps": steps, "guidance": guidance}
