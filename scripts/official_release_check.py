"""Load a blendexp export exactly as the official Arc2Face expression demo does, with the diffusers version its
requirements pin, in an isolated environment, and generate: proof that the exports drop into the official release.

    uv run python scripts/official_release_check.py --models outputs/ref_adapter/<run>/export/models \
        --base-models data/toy/models --sd15 data/toy/stable-diffusion-v1-5 --out official.npz

``--models`` holds ``exp_adapter/exp_adapter.bin`` and/or ``ref_adapter/pytorch_lora_weights.safetensors`` (a
training run's ``export/models``); the base is ``--base-models/arc2face`` + ``--base-models/encoder`` and the SD 1.5
folder, as in the official layout. The official pins (gradio_demo's requirements: diffusers 0.29.2, transformers
4.36.0) are installed with ``uv pip install --target`` into ``--env`` (kept; reused) and put ahead of the project's
packages; torch stays the project's (the pinned 2.0.1 does not install on this machine). The same call then runs
in the project's environment (current diffusers); ``--out`` gets both sets of images (``official``, ``current``)
and the script prints their largest difference and exits 1 if they differ by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

PINS = ["diffusers==0.29.2", "transformers==4.36.0", "huggingface_hub==0.23.4", "peft==0.11.1", "tokenizers==0.15.2"]
DEFAULT_ENV = Path(__file__).resolve().parent.parent / ".cache" / "official-diffusers-0.29.2"


def generate(models: Path, base_models: Path, sd15: Path, seed: int,
             size: int | None = None) -> dict[str, np.ndarray]:
    """The official demo's loading calls (load_ip_adapter from models/exp_adapter, load_lora_weights from
    models/ref_adapter as "ref"), then 2 DPM-Solver steps per LoRA scale at ``size`` px (default: the UNet's);
    plain diffusers only, no blendexp."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    fp32 = {"torch_dtype": torch.float32}  # on CPU; the official weights are stored in float16
    unet = UNet2DConditionModel.from_pretrained(str(base_models), subfolder="arc2face", **fp32)
    encoder = CLIPTextModel.from_pretrained(str(base_models), subfolder="encoder", **fp32)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15), text_encoder=encoder, unet=unet, safety_checker=None,
                                                   **fp32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    has_exp, has_ref = (models / "exp_adapter").is_dir(), (models / "ref_adapter").is_dir()
    if has_exp:
        pipe.load_ip_adapter(str(models), subfolder="exp_adapter", weight_name="exp_adapter.bin",
                             image_encoder_folder=None)
    if has_ref:
        pipe.load_lora_weights(str(models / "ref_adapter"), weight_name="pytorch_lora_weights.safetensors",
                               adapter_name="ref")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)  # the ID prompt's embeddings
    exp = torch.randn(1, 1, 55, generator=g)
    size = size or 8 * unet.config.sample_size
    out = {}
    for lora_scale in ([0.0, 1.0] if has_ref else [None]):
        if lora_scale is not None:
            pipe.set_adapters("ref", lora_scale)
        kwargs = {"ip_adapter_image_embeds": [torch.cat([torch.zeros_like(exp), exp])]} if has_exp else {}
        images = pipe(prompt_embeds=prompt, num_inference_steps=2, guidance_scale=3.0, height=size, width=size,
                      generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images
        out[f"lora_{lora_scale}"] = np.asarray(images)
    return out


def install(env: Path) -> None:
    """The official pins into ``env`` (once), without dependencies: torch and the rest stay the project's."""
    if (env / "diffusers-0.29.2.dist-info").is_dir():
        return
    uv = shutil.which("uv")
    if uv is None:
        sys.exit("error: uv not found on PATH (pip install uv); it installs the official pins into --env")
    cmd = [uv, "pip", "install", "--quiet", "--python", sys.executable, "--target", str(env), "--no-deps", *PINS]
    res = subprocess.run(cmd, text=True, capture_output=True)
    if res.returncode != 0:
        sys.exit(f"error: could not install {' '.join(PINS)} into {env}:\n{res.stderr[-2000:]}")


def main() -> None:
    """Generate with the official pins (a child process) and with the project's diffusers, then compare."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True, help="folder with exp_adapter/ and/or ref_adapter/")
    p.add_argument("--base-models", type=Path, required=True, help="folder with arc2face/ and encoder/")
    p.add_argument("--sd15", type=Path, required=True, help="the SD 1.5 folder (vae, tokenizer, scheduler)")
    p.add_argument("--out", type=Path, required=True, help=".npz with both sets of images")
    p.add_argument("--env", type=Path, default=DEFAULT_ENV, help="where the official pins are installed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--atol", type=float, default=2e-3, help="largest pixel difference (0..1) accepted")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not any((a.models / d).is_dir() for d in ("exp_adapter", "ref_adapter")):
        sys.exit(f"error: {a.models} holds neither exp_adapter/ nor ref_adapter/ (give a run's export/models)")
    if a.child:  # inside the official pins: plain diffusers, results as JSON on stdout
        import diffusers

        images = generate(a.models, a.base_models, a.sd15, a.seed)
        print("IMAGES " + json.dumps({"diffusers": diffusers.__version__,
                                      "images": {k: v.tolist() for k, v in images.items()}}))
        return
    install(a.env)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(a.env), os.environ.get("PYTHONPATH", "")]),
           "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child"], env=env, text=True, capture_output=True)
    lines = [x for x in res.stdout.splitlines() if x.startswith("IMAGES ")]
    if res.returncode != 0 or not lines:
        sys.exit(f"error: the official pins failed to load or run the export:\n{res.stderr[-4000:]}")
    child = json.loads(lines[-1].removeprefix("IMAGES "))
    official = {k: np.asarray(v, np.float32) for k, v in child["images"].items()}
    current = generate(a.models, a.base_models, a.sd15, a.seed)
    np.savez(a.out, **{f"official_{k}": v for k, v in official.items()}, **{f"current_{k}": v for k, v in current.items()})
    worst = max(float(np.abs(official[k] - current[k]).max()) for k in current)
    print(f"diffusers {child['diffusers']} (official pin) vs current: largest pixel difference {worst:.2e} "
          f"over {', '.join(sorted(current))}")
    if worst > a.atol:
        sys.exit(f"error: the official pin generates other images (difference {worst:.2e} > {a.atol})")


if __name__ == "__main__":
    main()
