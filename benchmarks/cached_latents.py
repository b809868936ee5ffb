"""Training step with cached VAE latents against encoding pixels on the fly.

    python benchmarks/cached_latents.py [--vae <AutoencoderKL folder>] [--size 64] [--batch 8] [--steps 30]

Both runs use the Expression Adapter module on the same base, batch and AdamW step; one batch carries
``pixel_values`` (the module runs the VAE encoder every step), the other ``latents`` precomputed by the
builder's recipe (posterior mean x scaling factor). One torch thread (steadier on a shared machine); runs
alternate and the fastest of ``--repeats`` counts.
By default the tiny random base (whose VAE is a few thousand parameters) is used, so the speed-up is a
lower bound; pass ``--vae <sd15>/vae`` (with ``--size 512``) to measure SD's real encoder.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import AutoencoderKL

from blendexp.modules.expression import ExpressionAdapterModule


def step_time(module: ExpressionAdapterModule, batch: dict, steps: int) -> float:
    """Seconds per forward + backward + AdamW step after 3 warm-up steps."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    module.train()
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        module.forward_loss(batch).backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    """Build both batches, time both, print the speed-up."""
    p = argparse.ArgumentParser()
    p.add_argument("--vae", default=None, help="AutoencoderKL folder replacing the tiny base's VAE")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        module = ExpressionAdapterModule(
            base={"models": f"{root}/models", "sd15": f"{root}/stable-diffusion-v1-5", "tiny_root": root},
            adapter={"num_tokens": 4, "projection": "linear"}, noise={"prediction_type": "epsilon"},
            dropout={}, optim={"lr": 1e-4, "warmup_steps": 0})
    if a.vae:
        module.vae = AutoencoderKL.from_pretrained(a.vae).eval().requires_grad_(False)
    pixels = torch.rand(a.batch, 3, a.size, a.size) * 2 - 1
    with torch.no_grad():
        latents = module.vae.encode(pixels).latent_dist.mean * module.vae.config.scaling_factor
    common = {"id": torch.randn(a.batch, 512), "exp": torch.randn(a.batch, 55)}
    on_the_fly, cached = float("inf"), float("inf")
    for _ in range(a.repeats):
        on_the_fly = min(on_the_fly, step_time(module, {"pixel_values": pixels, **common}, a.steps))
        cached = min(cached, step_time(module, {"latents": latents, **common}, a.steps))
    print(f"encode on the fly: {on_the_fly * 1e3:.1f} ms/step   cached latents: {cached * 1e3:.1f} ms/step   "
          f"speed-up: {on_the_fly / cached:.2f}x ({'tiny' if not a.vae else a.vae} VAE, {a.size} px, batch {a.batch})")


if __name__ == "__main__":
    main()
