"""Generation time in reference mode against no reference, on the same pipeline, seed and settings.

    python benchmarks/reference_mode.py [--size 128] [--steps 25] [--repeats 1] [--device cpu] [--sd15-unet]
                                        [--models M --sd15 S]

Both runs use the official demo's settings (DPM-Solver, 25 steps, guidance 3.0; LoRA scale 0.8 with a reference,
0 without) on the tiny base unless ``--models``/``--sd15`` point at real weights; ``--sd15-unet`` swaps in a random
UNet of SD 1.5's size, whose balance of attention and convolution is the real one. Reference mode adds one reference
UNet pass per image and longer self-attention keys in the conditional half; the printed ratio is its time over the
plain run's (goal: <= 1.30, which only holds when the reference UNet runs once, not once per step).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.expression_adapter import attach_expression_adapter, expression_embeds
from blendexp.models.reference_adapter import (
    DEMO_GUIDANCE,
    DEMO_STEPS,
    add_reference_lora,
    add_reference_reader,
    generate_with_reference,
    reference_lora_parameters,
    reference_unet,
)
from blendexp.models.tiny import ensure_tiny_base


def timed(run, device: str) -> float:
    """Seconds of one call, with the device's queue drained before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    """Build a reference-mode pipeline, time both modes after a short warm-up, print the ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--steps", type=int, default=DEMO_STEPS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", help="official-layout models folder (default: a tiny random base)")
    p.add_argument("--sd15", help="SD 1.5 folder for VAE, tokenizer and scheduler (with --models)")
    p.add_argument("--sd15-unet", action="store_true", help="a random UNet with SD 1.5's architecture")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each mode; the fastest counts")
    a = p.parse_args()
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as root:
        models, sd15 = (a.models, a.sd15) if a.models else ensure_tiny_base(root)
        base = Arc2FaceBase.from_pretrained(models, sd15, dtype=dtype)
    if a.sd15_unet:  # diffusers' defaults are SD 1.5's blocks; cross-attention as wide as this text encoder
        base.unet = UNet2DConditionModel(cross_attention_dim=base.text_encoder.config.hidden_size,
                                         attention_head_dim=8).to(dtype)
    ref_unet = reference_unet(base.unet).to(a.device)
    attach_expression_adapter(base.unet)
    add_reference_lora(base.unet, rank=16, alpha=16)
    for w in reference_lora_parameters(base.unet):
        w.data.normal_(0, 0.01)  # a trained-like LoRA, so scale 0.8 vs 0 is real work in both modes
    add_reference_reader(base.unet)
    pipe = base.pipeline(DPMSolverMultistepScheduler.from_config(base.scheduler.config)).to(a.device)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    prompt = id_prompt_embeds(base.text_encoder.to(a.device), base.tokenizer, torch.randn(1, 512, device=a.device))
    reference = torch.rand(1, 3, a.size, a.size, device=a.device, dtype=dtype) * 2 - 1
    exp = expression_embeds(torch.randn(1, 55, device=a.device, dtype=dtype), DEMO_GUIDANCE > 1)
    ref_calls: list[int] = []
    ref_unet.register_forward_hook(lambda *_: ref_calls.append(1))

    def generate(ref: torch.Tensor | None, steps: int) -> None:
        generate_with_reference(pipe, ref_unet, ref, prompt, num_inference_steps=steps, height=a.size, width=a.size,
                                ip_adapter_image_embeds=exp, generator=torch.Generator(a.device).manual_seed(0),
                                output_type="np")

    with torch.inference_mode():
        generate(None, 2)  # warm-up: allocator, kernels, lazy imports
        generate(reference, 2)
        ref_calls.clear()
        plain, with_ref = float("inf"), float("inf")
        for _ in range(a.repeats):  # alternate so background load hits both modes alike
            plain = min(plain, timed(lambda: generate(None, a.steps), a.device))
            with_ref = min(with_ref, timed(lambda: generate(reference, a.steps), a.device))
    unet = "SD 1.5-size UNet" if a.sd15_unet or a.models else "tiny UNet"
    print(f"{unet}, {a.size}px, {a.steps} steps, guidance {DEMO_GUIDANCE}, {a.device}: no reference {plain:.2f} s   "
          f"reference mode {with_ref:.2f} s ({len(ref_calls) / a.repeats:g} reference UNet pass per image)   "
          f"ratio: {with_ref / plain:.3f} (goal <= 1.30)")


if __name__ == "__main__":
    main()
