"""Training step with cached VAE latents against encoding pixels on the fly.

    python benchmarks/cached_latents.py [--vae <AutoencoderKL folder>] [--size 256] [--batch 8] [--steps 20]
                                        [--repeats 3] [--check] [--quick]

Both runs use the Expression Adapter module on the same base, batch and AdamW step; one batch carries
``pixel_values`` (the module runs the VAE encoder every step), the other ``latents`` precomputed by the
builder's recipe (posterior mean x scaling factor). Runs alternate and the fastest of ``--repeats`` counts.
Figure: on-the-fly step time over cached step time (goal in goals.py, at 256 px).
By default the shipped toy base (what ``blendexp.train`` trains on) is used; its VAE is far smaller than SD's, so
the speed-up is a lower bound: pass ``--vae <sd15>/vae`` (with ``--size 512``) to measure SD's real encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable

import torch
from diffusers import AutoencoderKL

from blendexp.config import REPO_ROOT
from blendexp.modules.expression import ExpressionAdapterModule
from goals import Round, alternating, check_args, standalone

NAME = "cached_latents"
QUICK = ["--steps", "2", "--batch", "2", "--size", "64"]


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


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = check_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--models", default=str(REPO_ROOT / "data/toy/models"), help="official-layout models folder")
    p.add_argument("--sd15", default=str(REPO_ROOT / "data/toy/stable-diffusion-v1-5"), help="VAE, tokenizer, scheduler")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder replacing the base's VAE")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    return p


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> Callable[[], Round]:
    """One module and both batches; one round times encoding on the fly, then cached latents."""
    torch.manual_seed(0)
    module = ExpressionAdapterModule(
        base={"models": args.models, "sd15": args.sd15, "tiny_root": None},
        adapter={"num_tokens": 4, "projection": "linear"}, noise={"prediction_type": None},
        dropout={}, optim={"lr": 1e-4, "warmup_steps": 0})
    if args.vae:
        module.vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    pixels = torch.rand(args.batch, 3, args.size, args.size) * 2 - 1
    with torch.no_grad():
        latents = module.vae.encode(pixels).latent_dist.mean * module.vae.config.scaling_factor
    common = {"id": torch.randn(args.batch, 512), "exp": torch.randn(args.batch, 55)}

    return alternating({"on_the_fly": lambda: step_time(module, {"pixel_values": pixels, **common}, args.steps),
                        "cached": lambda: step_time(module, {"latents": latents, **common}, args.steps)},
                       lambda: {"setting": f"VAE {args.vae or args.sd15}, {args.size} px, batch {args.batch}"})


def figure(rounds: list[Round]) -> tuple[float, str]:
    """Fastest on-the-fly step over fastest cached step (the speed-up caching buys)."""
    fly, cached = min(r["on_the_fly"] for r in rounds), min(r["cached"] for r in rounds)
    return fly / cached, (f"encode on the fly {fly * 1e3:.1f} ms/step, cached latents {cached * 1e3:.1f} ms/step "
                          f"({rounds[0]['setting']})")


if __name__ == "__main__":
    standalone(__import__(__name__))
