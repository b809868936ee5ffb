"""Time of ``ExpressionPipeline.__call__`` against a plain diffusers pipeline with the same weights and adapter.

    python benchmarks/generate_overhead.py [--size 64] [--steps 25] [--samples 4] [--repeats 3] [--device cpu]
                                           [--models M --sd15 S] [--check] [--quick]

A plain diffusers pipeline built by hand (the base, tiny unless ``--models``/``--sd15`` point at real weights, and
the exported Expression Adapter through ``load_ip_adapter``, DPM-Solver) must make the API's images (checked before
timing; different images fail the benchmark). The timed reference is a plain diffusers call, with the ID prompt
embeddings and ``ip_adapter_image_embeds`` built by hand as the README shows, on the API's own ``StableDiffusionPipeline``
(``.pipe``), and it must make the same images every round: the same modules in the same memory, so the figure is the
API's own cost (input checks, uint8 conversion) and not where two copies of the weights happen to sit (two identical
hand-built pipelines differed by up to 20% in time on the 2-core CPU). Figure: the API's time over that plain call's.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

from blendexp.flame import preset
from blendexp.models.arc2face import Arc2FaceBase, Arc2FaceTextEncoder, id_prompt_embeds
from blendexp.models.expression_adapter import attach_expression_adapter, expression_embeds, save_expression_adapter
from blendexp.models.tiny import ensure_tiny_base
from blendexp.pipeline import ExpressionPipeline
from goals import Round, alternating, check_args, standalone

NAME = "generate_overhead"
QUICK = ["--steps", "4", "--samples", "2"]


def timed(run: Callable[[], np.ndarray], device: str) -> tuple[float, np.ndarray]:
    """Seconds of one call (the device's queue drained before and after) and its images."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, images


def exported_adapter(models: str, sd15: str, folder: Path) -> Path:
    """A trained-like Expression Adapter (perturbed weights) exported in the official format."""
    base = Arc2FaceBase.from_pretrained(models, sd15)
    torch.manual_seed(0)
    for p in attach_expression_adapter(base.unet):
        p.data.add_(torch.randn_like(p) * 0.05)
    save_expression_adapter(base.unet, folder)
    return folder


def plain_pipeline(models: str, sd15: str, adapter: Path, dtype: torch.dtype, device: str) -> StableDiffusionPipeline:
    """The pipeline a diffusers user builds by hand: SD 1.5 parts, Arc2Face UNet and encoder, ``load_ip_adapter``."""
    pipe = StableDiffusionPipeline.from_pretrained(
        sd15, unet=UNet2DConditionModel.from_pretrained(models, subfolder="arc2face", dtype=dtype),
        text_encoder=Arc2FaceTextEncoder.from_pretrained(models, subfolder="encoder", dtype=dtype),
        safety_checker=None, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(adapter), subfolder="", weight_name="exp_adapter.safetensors", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def pipeline_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options both generation benchmarks share: device and base."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", help="official-layout models folder (default: a tiny random base)")
    p.add_argument("--sd15", help="SD 1.5 folder for VAE, tokenizer and scheduler (with --models)")
    return p


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = pipeline_args(check_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])))
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=4, help="images per call (one expression)")
    p.add_argument("--guidance", type=float, default=3.0)
    return p


def both_pipelines(args: argparse.Namespace, stack: contextlib.ExitStack,
                   reference_lora: Callable[[str, str, Path], Path] | None = None
                   ) -> tuple[ExpressionPipeline, StableDiffusionPipeline]:
    """The API (with the LoRA ``reference_lora`` writes, if given) and the plain pipeline: same base and adapter."""
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    models, sd15 = (args.models, args.sd15) if args.models else map(str, ensure_tiny_base(root / "tiny"))
    adapter = exported_adapter(models, sd15, root / "exp_adapter")
    ref = reference_lora(models, sd15, root / "ref_adapter") if reference_lora else None
    api = ExpressionPipeline.from_pretrained(models, sd15, expression_adapter=adapter, reference_adapter=ref,
                                             dtype=dtype, device=args.device)
    return api, plain_pipeline(models, sd15, adapter, dtype, args.device)


def plain_call(plain: StableDiffusionPipeline, id_emb: np.ndarray, exp: np.ndarray, steps: int, guidance: float,
               size: int, samples: int) -> np.ndarray:
    """The API's work by hand: ID prompt embeddings, CFG adapter embeddings, the pipeline, uint8 conversion."""
    device, dtype = plain.unet.device, plain.unet.dtype
    prompt = id_prompt_embeds(plain.text_encoder, plain.tokenizer, torch.from_numpy(id_emb)[None].to(device))
    exp_t = torch.from_numpy(exp)[None].to(device, dtype)
    out = plain(prompt_embeds=prompt.to(dtype), ip_adapter_image_embeds=expression_embeds(exp_t, guidance > 1),
                num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                num_images_per_prompt=samples, output_type="np",
                generator=[torch.Generator(device).manual_seed(k) for k in range(samples)])
    return (out.images * 255).round().astype(np.uint8)


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> Callable[[], Round]:
    """Build both pipelines and warm them up; one round times each once (plain first) and compares the images."""
    api, built = both_pipelines(args, stack)
    id_emb = np.random.default_rng(0).normal(size=512).astype(np.float32)
    exp = preset("smile")
    with torch.inference_mode():
        same_as_built = np.array_equal(plain_call(built, id_emb, exp, 2, args.guidance, args.size, args.samples),
                                       api(id_emb, exp, num_images=args.samples, steps=2, guidance=args.guidance,
                                           size=args.size, batch_size=args.samples))
    del built

    def run_api(steps: int) -> np.ndarray:
        """The API's call: identity and expression in, uint8 images out."""
        return api(id_emb, exp, num_images=args.samples, steps=steps, guidance=args.guidance, size=args.size,
                   batch_size=args.samples)

    def run_plain(steps: int) -> np.ndarray:
        return plain_call(api.pipe, id_emb, exp, steps, args.guidance, args.size, args.samples)

    with torch.inference_mode():
        run_api(2), run_plain(2)  # warm-up: allocator, kernels, lazy imports

    images: dict[str, np.ndarray] = {}

    def side(name: str, run: Callable[[int], np.ndarray]) -> Callable[[], float]:
        def seconds() -> float:
            took, images[name] = timed(lambda: run(args.steps), args.device)
            return took
        return seconds

    return torch.inference_mode()(alternating(
        {"plain": side("plain", run_plain), "api": side("api", run_api)},
        lambda: {"same": same_as_built and bool(np.array_equal(images["api"], images["plain"]))}, times=3))


def figure(rounds: list[Round]) -> tuple[float, str, list[str]]:
    """Fastest API call over fastest plain call; any round with different images fails the benchmark."""
    plain, api = min(r["plain"] for r in rounds), min(r["api"] for r in rounds)
    unequal = [f"generate_overhead: ExpressionPipeline's images differ from the plain pipeline's in round {i}"
               for i, r in enumerate(rounds) if not r["same"]]
    return api / plain, f"plain diffusers {plain:.3f} s, ExpressionPipeline {api:.3f} s, same images", unequal


if __name__ == "__main__":
    standalone(__import__(__name__))
