"""A small AutoencoderKL trained on toy faces: the toy base's VAE, with SD's 8x downsampling and, as SD3's, 16 latent
channels (SD 1.5's 4 keep too little of a 64 px face: its 8x8 latents are the toy base's whole canvas).

A random VAE would make the toy base learn noise; a trained one gives latents that mean something, and its
``scaling_factor`` is set the way SD's 0.18215 was chosen (1 / std of the latents), so the diffusion recipes
see unit-variance latents without any toy-specific code.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import AutoencoderKL

from blendexp.images import to_uint8
from blendexp.models.tiny import tiny_vae
from blendexp.toyworld.fitting import fit
from blendexp.toyworld.recipes import VaeTraining

log = logging.getLogger(__name__)
# Where an aligned toy face's expression lives, in image fractions (x, y): centre and Gaussian spread of the weights
FACE_CENTRE, FACE_SPREAD = (0.5, 0.57), (0.15, 0.2)


def toy_vae(width: int = 16, latent_channels: int = 4) -> AutoencoderKL:
    """The tiny base's AutoencoderKL shape (SD's 8x downsampling), ``width`` channels wide."""
    return tiny_vae(latent_channels, (width, 2 * width, 2 * width, 2 * width))


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def face_weights(size: int, amp: float) -> torch.Tensor:
    """(size, size) pixel-loss weights of mean 1 that rise to about 1 + ``amp`` between an aligned face's brows and
    mouth: like SD's perceptual loss, they spend the VAE's few latents on the expression rather than on background,
    hair and shirt (a smile, the furrow and the eyelids keep more of their change through a round trip)."""
    g = (torch.arange(size) + 0.5) / size
    (cx, cy), (sx, sy) = FACE_CENTRE, FACE_SPREAD
    w = 1 + amp * torch.exp(-((g[None, :] - cx) ** 2 / (2 * sx**2) + (g[:, None] - cy) ** 2 / (2 * sy**2)))
    return w / w.mean()


def train_vae(images: np.ndarray, cfg: VaeTraining, seed: int) -> AutoencoderKL:
    """Fit the VAE to reconstruct toy faces; sampled latents keep the decoder robust to the posterior's spread."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = toy_vae(cfg.width, cfg.latent_channels)
    vae.train()
    weights = face_weights(images.shape[1], cfg.face_weight)

    def step() -> tuple[torch.Tensor, dict[str, str]]:
        """Face-weighted reconstruction MSE plus the KL term on one random batch."""
        x = to_pixels(images[rng.integers(len(images), size=cfg.batch_size)])
        posterior = vae.encode(x).latent_dist
        mse = ((vae.decode(posterior.sample()).sample - x) ** 2 * weights).mean()
        return mse + cfg.kl_weight * posterior.kl().mean(), {"mse": f"{mse.item():.4f}"}

    fit(vae.parameters(), cfg.steps, cfg.lr, 0.0, 0.05, "toy VAE", step)
    return vae.eval()


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, images: np.ndarray, seed: int, batch_size: int = 64) -> float:
    """Store 1 / std of sampled latents as ``scaling_factor`` (how SD's 0.18215 was chosen) and return it."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.cat([vae.encode(to_pixels(images[s:s + batch_size])).latent_dist.sample(gen)
                         for s in range(0, len(images), batch_size)])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=factor)
    return factor


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between uint8 image stacks (N, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 faces encoded (posterior mean) and decoded: what a generated face can at best look like."""
    return np.concatenate([to_uint8(vae.decode(vae.encode(to_pixels(images[s:s + batch_size])).latent_dist.mode()).sample)
                           for s in range(0, len(images), batch_size)])


def vae_metrics(vae: AutoencoderKL, images: np.ndarray, mean_image: np.ndarray) -> dict[str, float]:
    """Reconstruction PSNR of held-out faces (posterior mean) vs. predicting the training mean image for each."""
    recon = round_trip(vae, images)
    baseline = np.broadcast_to(np.rint(mean_image).astype(np.uint8), images.shape)
    return {"psnr": float(psnr(recon, images).mean()), "mean_image_psnr": float(psnr(baseline, images).mean()),
            "scaling_factor": float(vae.config.scaling_factor), "images": len(images)}
