"""The full-size random base: SD 1.5 / CLIP ViT-L/14 shapes in the official layout, read by the real loaders."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.full_size import PARAMETERS
from tests.conftest import run_cli


def stored_dtypes(file: Path) -> set[str]:
    """The tensor dtypes in a safetensors file's header."""
    with open(file, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.slow
def test_full_size_base_has_the_published_sizes_and_loads_like_real_weights(tmp_path: Path) -> None:
    res = run_cli("blendexp.models.full_size", str(tmp_path), timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    models, sd15 = tmp_path / "models", tmp_path / "stable-diffusion-v1-5"
    assert f"models={models}" in res.stdout
    for weights in (models / "arc2face" / "diffusion_pytorch_model.safetensors", models / "encoder" / "model.safetensors",
                    sd15 / "vae" / "diffusion_pytorch_model.safetensors"):
        assert stored_dtypes(weights) == {"F16"}, weights  # as the official release stores them
    assert (sd15 / "scheduler" / "scheduler_config.json").is_file() and (sd15 / "tokenizer" / "vocab.json").is_file()
    base = Arc2FaceBase.from_pretrained(str(models), str(sd15))
    sizes = {"unet": base.unet, "text_encoder": base.text_encoder, "vae": base.vae}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in sizes.items()} == PARAMETERS
    # the 512-d ArcFace embedding is zero-padded into CLIP ViT-L's 768-d token (the tiny base is 512 wide)
    prompt = id_prompt_embeds(base.text_encoder, base.tokenizer, F.normalize(torch.randn(1, 512)))
    assert prompt.shape == (1, 77, 768) and torch.isfinite(prompt).all()
