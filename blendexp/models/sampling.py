"""One sampling call for every image blendexp generates: ``ExpressionPipeline``, the evaluation's methods, the
training recipes' sample grids and the toy base's identity score all go through ``sample``, so a setting means the
same thing everywhere and equal settings give equal images.

A call is one diffusers pipeline call: identity prompts (B, 77, D), one image per seed (``len(seeds)`` a multiple of
B, seeds of prompt ``b`` at rows ``b * n .. b * n + n - 1``), at most one expression (diffusers hands the same
``ip_adapter_image_embeds`` to every row of a call, so callers with one expression per row call once per row), and,
with a reference UNet, the Reference Adapter's reference mode.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from blendexp.models.expression_adapter import expression_embeds
from blendexp.models.reference_adapter import generate_with_reference


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, prompts: torch.Tensor, seeds: Sequence[int], *, steps: int,
           guidance: float, size: int, exp: torch.Tensor | None = None,
           negative: np.ndarray | torch.Tensor | None = None, ref_unet: UNet2DConditionModel | None = None,
           reference: torch.Tensor | None = None, lora_scale: float | None = None) -> np.ndarray:
    """(len(seeds), size, size, 3) uint8 images of one pipeline call, each from its own seeded generator.

    ``exp`` (1, 55): the Expression Adapter's input for the whole call (None: a pipeline without one);
    ``negative``: the FLAME vector guidance pushes away from (None: zeros). ``ref_unet``: reference mode with
    ``reference`` (B, 3, H, W) in [-1, 1] (None: LoRA off) at ``lora_scale`` (None: the adapter's current scale).
    """
    if len(seeds) % prompts.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {prompts.shape[0]} prompts; give the same number per prompt")
    call = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="np",
                num_images_per_prompt=len(seeds) // prompts.shape[0],
                generator=[torch.Generator(prompts.device).manual_seed(int(s)) for s in seeds])
    if exp is not None:
        call["ip_adapter_image_embeds"] = expression_embeds(exp, guidance > 1, negative)
    if ref_unet is None:
        out = pipe(prompt_embeds=prompts, **call)
    else:
        out = generate_with_reference(pipe, ref_unet, reference, prompts, lora_scale=lora_scale, **call)
    return (out.images * 255).round().astype(np.uint8)
