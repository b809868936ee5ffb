"""Generation in reference mode, as users run it, against a plain diffusers pipeline doing the same sampling.

    python benchmarks/reference_mode.py [--size 128] [--steps 25] [--samples 1] [--repeats 3] [--device cpu]
                                        [--models M --sd15 S] [--check] [--quick]

The user's side is ``ExpressionPipeline`` (the one generation path) loaded with the Expression Adapter and a
trained-like Reference Adapter (rank-16 LoRA ``ref`` with perturbed weights), called with a reference image at the
official demo's settings (DPM-Solver, guidance 3.0, LoRA scale 0.8). The reference is a plain
``StableDiffusionPipeline`` with the same base and Expression Adapter (``load_ip_adapter``) and nothing else: no
LoRA, no reference processors, no reference UNet. Reference mode adds one reference UNet pass per image, LoRA in
every attention projection and longer self-attention keys in the conditional half. Both run on the tiny random base
unless ``--models``/``--sd15`` point at real weights. Figure: reference mode's time over the plain pipeline's at
``--steps`` (goal in goals.py at 25 steps; it only holds when the reference UNet runs once per image, not per step).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from blendexp.flame import preset
from blendexp.models.arc2face import Arc2FaceBase
from blendexp.models.reference_adapter import DEMO_GUIDANCE, DEMO_STEPS, add_reference_lora, save_reference_lora
from generate_overhead import both_pipelines, pipeline_args, plain_call, timed
from goals import Round, alternating, check_args, standalone

NAME = "reference_mode"
QUICK = ["--steps", "4", "--size", "64"]


def trained_like_lora(models: str, sd15: str, folder: Path) -> Path:
    """A Reference Adapter LoRA with non-zero weights (a fresh one is a no-op), saved in diffusers' format."""
    base = Arc2FaceBase.from_pretrained(models, sd15)
    torch.manual_seed(1)
    for w in add_reference_lora(base.unet, rank=16, alpha=16):
        w.data.normal_(0, 0.01)
    save_reference_lora(base.unet, folder)
    return folder


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = pipeline_args(check_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--samples", type=int, default=1, help="images per call")
    return p


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> Callable[[], Round]:
    """Build both pipelines and warm them up; one round times the plain pipeline, then reference mode."""
    api, plain = both_pipelines(args, stack, trained_like_lora)
    rng = np.random.default_rng(0)
    id_emb = rng.normal(size=512).astype(np.float32)
    reference = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    exp = preset("smile")

    def run_api(steps: int) -> None:
        api(id_emb, exp, reference, num_images=args.samples, steps=steps, guidance=DEMO_GUIDANCE, size=args.size)

    def run_plain(steps: int) -> None:
        plain_call(plain, id_emb, exp, steps, DEMO_GUIDANCE, args.size, args.samples)

    ref_calls: list[int] = []
    api.ref_unet.register_forward_hook(lambda *_: ref_calls.append(1))
    with torch.inference_mode():
        run_api(2), run_plain(2)  # warm-up: allocator, kernels, lazy imports

    def reference_side() -> float:
        ref_calls.clear()
        return timed(lambda: run_api(args.steps), args.device)[0]

    return torch.inference_mode()(alternating(
        {"plain": lambda: timed(lambda: run_plain(args.steps), args.device)[0], "reference": reference_side},
        lambda: {"ref_passes": len(ref_calls)}, times=3))


def figure(rounds: list[Round]) -> tuple[float, str, list[str]]:
    """Fastest reference-mode call over fastest plain call; more than one reference UNet pass per call fails."""
    plain, ref = min(r["plain"] for r in rounds), min(r["reference"] for r in rounds)
    passes = max(r["ref_passes"] for r in rounds)
    extra = [] if passes == 1 else [f"reference_mode: {passes} reference UNet passes per call, expected 1"]
    return ref / plain, f"plain diffusers {plain:.3f} s, reference mode {ref:.3f} s ({passes} reference pass)", extra


if __name__ == "__main__":
    standalone(__import__(__name__))
