"""Expression Adapter interop: export → plain diffusers ``load_ip_adapter`` → generation, and import back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.expression_adapter import (
    attach_expression_adapter,
    expression_embeds,
    load_expression_adapter,
    save_expression_adapter,
)


def trained_like_adapter(tiny_base: tuple[Path, Path], folder: Path, **cfg) -> Arc2FaceBase:
    """Attach an adapter, perturb it as training would, export it."""
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    torch.manual_seed(0)
    for p in attach_expression_adapter(base.unet, **cfg):
        p.data.add_(torch.randn_like(p) * 0.05)
    save_expression_adapter(base.unet, folder)
    return base


def generate(pipe: StableDiffusionPipeline, prompt_embeds: torch.Tensor, **kw) -> torch.Tensor:
    out = pipe(prompt_embeds=prompt_embeds, num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="pt", **kw)
    return out.images


@pytest.mark.parametrize("cfg,weight", [({"num_tokens": 4, "projection": "linear"}, "exp_adapter.bin"),
                                        ({"num_tokens": 6, "projection": "mlp"}, "exp_adapter.safetensors")])
def test_official_usage_in_plain_diffusers(tiny_base, tmp_path: Path, cfg: dict, weight: str) -> None:
    models, sd15 = tiny_base
    base = trained_like_adapter(tiny_base, tmp_path / "models" / "exp_adapter", **cfg)
    fresh_unet = lambda: UNet2DConditionModel.from_pretrained(models, subfolder="arc2face")  # noqa: E731
    pipe = StableDiffusionPipeline.from_pretrained(sd15, text_encoder=base.text_encoder, unet=fresh_unet(),
                                                   safety_checker=None)
    pipe.load_ip_adapter(str(tmp_path / "models"), subfolder="exp_adapter", weight_name=weight,
                         image_encoder_folder=None)
    plain = StableDiffusionPipeline.from_pretrained(sd15, text_encoder=base.text_encoder, unet=fresh_unet(),
                                                    safety_checker=None)
    prompt = id_prompt_embeds(base.text_encoder, base.tokenizer, torch.randn(1, 512))
    exp = torch.randn(1, 55)
    embeds = [torch.cat([torch.zeros_like(exp), exp])[:, None, :]]
    assert embeds[0].shape == (2, 1, 55)
    reference = generate(plain, prompt)
    pipe.set_ip_adapter_scale(0.0)
    torch.testing.assert_close(generate(pipe, prompt, ip_adapter_image_embeds=embeds), reference)
    pipe.set_ip_adapter_scale(1.0)
    with_exp = generate(pipe, prompt, ip_adapter_image_embeds=embeds)
    assert (with_exp - reference).abs().max() > 1e-2
    other = generate(pipe, prompt, ip_adapter_image_embeds=expression_embeds(torch.randn(1, 55), True))
    assert (other - with_exp).abs().max() > 1e-3  # the expression, not just the adapter, changes the image


def test_import_matches_diffusers_loader(tiny_base, tmp_path: Path) -> None:
    models, sd15 = tiny_base
    base = trained_like_adapter(tiny_base, tmp_path / "ad", num_tokens=8, projection="mlp", mult=2)
    theirs = UNet2DConditionModel.from_pretrained(models, subfolder="arc2face")
    pipe = StableDiffusionPipeline.from_pretrained(sd15, text_encoder=base.text_encoder, unet=theirs, safety_checker=None)
    pipe.load_ip_adapter(str(tmp_path), subfolder="ad", weight_name="exp_adapter.bin", image_encoder_folder=None)
    ours = UNet2DConditionModel.from_pretrained(models, subfolder="arc2face")
    cfg = load_expression_adapter(ours, tmp_path / "ad")
    assert cfg == {"projection": "mlp", "num_tokens": 8, "mult": 2}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    states, exp = torch.randn(2, 77, 512), [torch.randn(2, 1, 55)]
    a = ours(x, t, states, added_cond_kwargs={"image_embeds": exp}).sample
    b = pipe.unet(x, t, states, added_cond_kwargs={"image_embeds": exp}).sample
    torch.testing.assert_close(a, b)


def test_linear_projection_requires_four_tokens(tiny_base) -> None:
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    with pytest.raises(ValueError, match="4 tokens"):
        attach_expression_adapter(base.unet, num_tokens=8, projection="linear")


def test_missing_checkpoint_names_path(tiny_base, tmp_path: Path) -> None:
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_expression_adapter(base.unet, tmp_path)
