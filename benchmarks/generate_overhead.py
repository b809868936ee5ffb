"""Time of ``ExpressionPipeline.__call__`` against a plain diffusers pipeline with the same weights and adapter.

    python benchmarks/generate_overhead.py [--size 64] [--steps 25] [--samples 4] [--repeats 3] [--device cpu]
                                           [--threads N] [--models M --sd15 S]

Both sides load the same base (the tiny one unless ``--models``/``--sd15`` point at real weights) and the same
exported Expression Adapter through ``load_ip_adapter``, use DPM-Solver, and make the same images (checked): the plain
side builds the ID prompt embeddings and ``ip_adapter_image_embeds`` by hand, as the README shows. The printed ratio
is the API's time over the plain pipeline's (goal: <= 1.02; the API adds only input checks and uint8 conversion).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

from blendexp.expressions import preset
from blendexp.models.arc2face import Arc2FaceBase, Arc2FaceTextEncoder, id_prompt_embeds
from blendexp.models.expression_adapter import attach_expression_adapter, expression_embeds, save_expression_adapter
from blendexp.models.tiny import ensure_tiny_base
from blendexp.pipeline import ExpressionPipeline


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


def main() -> None:
    """Build both pipelines, warm up, time each (alternating, fastest of ``--repeats``), print the ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--samples", type=int, default=4, help="images per call (one expression)")
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--models", help="official-layout models folder (default: a tiny random base)")
    p.add_argument("--sd15", help="SD 1.5 folder for VAE, tokenizer and scheduler (with --models)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; the fastest counts")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as root:
        models, sd15 = (a.models, a.sd15) if a.models else map(str, ensure_tiny_base(Path(root) / "tiny"))
        adapter = exported_adapter(models, sd15, Path(root) / "exp_adapter")
        api = ExpressionPipeline.from_pretrained(models, sd15, expression_adapter=adapter, dtype=dtype, device=a.device)
        plain = plain_pipeline(models, sd15, adapter, dtype, a.device)
    id_emb = np.random.default_rng(0).normal(size=512).astype(np.float32)
    exp = preset("smile")

    def run_api(steps: int) -> np.ndarray:
        """The API's call: identity and expression in, uint8 images out."""
        return api(id_emb, exp, num_images=a.samples, steps=steps, guidance=a.guidance, size=a.size,
                   batch_size=a.samples)

    def run_plain(steps: int) -> np.ndarray:
        """The same work by hand: ID prompt embeddings, CFG adapter embeddings, the pipeline, uint8 conversion."""
        prompt = id_prompt_embeds(plain.text_encoder, plain.tokenizer, torch.from_numpy(id_emb)[None].to(a.device))
        exp_t = torch.from_numpy(exp)[None].to(a.device, dtype)
        out = plain(prompt_embeds=prompt.to(dtype), ip_adapter_image_embeds=expression_embeds(exp_t, a.guidance > 1),
                    num_inference_steps=steps, guidance_scale=a.guidance, height=a.size, width=a.size,
                    num_images_per_prompt=a.samples, output_type="np",
                    generator=[torch.Generator(a.device).manual_seed(k) for k in range(a.samples)])
        return (out.images * 255).round().astype(np.uint8)

    with torch.inference_mode():
        same = np.array_equal(run_api(2), run_plain(2))  # warm-up: allocator, kernels, lazy imports
        api_s, plain_s = float("inf"), float("inf")
        for _ in range(a.repeats):  # alternate so background load hits both sides alike
            plain_s = min(plain_s, timed(lambda: run_plain(a.steps), a.device)[0])
            api_s = min(api_s, timed(lambda: run_api(a.steps), a.device)[0])
    unet = "real UNet" if a.models else "tiny UNet"
    print(f"{unet}, {a.size}px, {a.steps} steps, {a.samples} images, {a.device}: plain diffusers {plain_s:.3f} s   "
          f"ExpressionPipeline {api_s:.3f} s (same images: {same})   ratio: {api_s / plain_s:.3f} (goal <= 1.02)")


if __name__ == "__main__":
    main()
