"""How each trained toy-world asset is trained: the settings of ``python -m blendexp.toyworld.assets``, kept free of
torch so the command's options and fingerprints need no heavy import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IdentityTraining:
    """How the toy recogniser is trained (CosFace margin softmax over the training identities)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    width: int = 16
    margin: float = 0.3  # CosFace's additive cosine margin
    scale: float = 24.0  # logit scale of the normalised cosines
    small_p: float = 0.5  # share of training images first shrunk to 64 px


@dataclass(frozen=True)
class ExpressionTraining:
    """How the SMIRK-architecture encoder is trained (range-scaled MSE on the 55 values). From scratch it predicts
    the mean for the first ~700 steps before it starts to read expressions; the smiles, the furrow and the eyelids
    are read only after ~3000 (experiments/toy_readability), hence the long default."""

    steps: int = 4000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    decoded_p: float = 0.4  # share of training faces replaced by their 64 px toy-VAE round trip
    blur_p: float = 0.2  # share shrunk to 64 px and blurred
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    small_p: float = 0.3  # of the remaining faces, share shrunk to 64 px


@dataclass(frozen=True)
class VaeTraining:
    """How the toy VAE is trained: face-weighted pixel MSE plus a small KL term (SD's VAE also keeps the KL weight
    tiny)."""

    steps: int = 2500
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    width: int = 32  # 16 gave 21 dB round trips that erase eyelids and mouth corners
    latent_channels: int = 16  # SD3-like; 4 (SD 1.5's) kept too little of a 64 px face: 24.7 dB, jaw read 0.46x
    face_weight: float = 4.0  # pixel loss up to 1 + this at the face's centre (0: plain MSE); experiments/toy_readability


@dataclass(frozen=True)
class BaseTraining:
    """Overrides for ``+experiment=toy_base`` plus how the trained base is measured."""

    steps: int = 4000  # 6000 took 51 of the build's 105 minutes on 2 cores (experiments/toy_readability)
    batch_size: int = 32
    lr: float = 1e-3
    overrides: tuple[str, ...] = ()  # any further Hydra overrides
    eval_identities: int = 48  # held-out identities the base generates
    eval_samples: int = 2  # seeds per identity
    eval_steps: int = 20  # DPM-Solver steps
    eval_guidance: float = 3.0
