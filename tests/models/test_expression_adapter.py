"""Expression Adapter interop: export → plain diffusers ``load_ip_adapter`` → generation, and import back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.expression_adapter import (
    adapter_parameters,
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


SCALES = {"exp": 1.0, "eyelid": 3.0, "jaw": 10.0}


@pytest.mark.parametrize("cfg,weight", [({"num_tokens": 4, "projection": "linear"}, "exp_adapter.bin"),
                                        ({"num_tokens": 6, "projection": "mlp"}, "exp_adapter.safetensors"),
                                        ({"num_tokens": 4, "projection": "linear", "input_scale": SCALES},
                                         "exp_adapter.safetensors")])
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


@pytest.mark.parametrize("projection,tokens", [("linear", 4), ("mlp", 2)])
def test_input_scale_steps_the_jaw_faster_and_exports_what_the_layer_computes(tiny_base, tmp_path: Path,
                                                                              projection: str, tokens: int) -> None:
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    torch.manual_seed(0)
    params = attach_expression_adapter(base.unet, num_tokens=tokens, projection=projection, input_scale=SCALES)
    proj = base.unet.encoder_hid_proj.image_projection_layers[0]
    layer = proj.image_embeds if projection == "linear" else proj.ff.net[0].proj
    before = layer.weight.detach().clone()
    opt = torch.optim.Adam(params, lr=1e-3)
    out = proj(torch.randn(8, 55))
    (out * torch.randn_like(out)).sum().backward()  # (a LayerNorm'd output's own norm would give no gradient)
    opt.step()
    step = (layer.weight.detach() - before).abs().mean(0)  # Adam's first step is lr per trained weight
    torch.testing.assert_close(step[:50].mean(), torch.tensor(1e-3), rtol=0.05, atol=0)  # expression: x1
    torch.testing.assert_close(step[50:52].mean(), torch.tensor(3e-3), rtol=0.05, atol=0)  # eyelids: x3
    torch.testing.assert_close(step[52:].mean(), torch.tensor(1e-2), rtol=0.05, atol=0)  # jaw: x10
    save_expression_adapter(base.unet, tmp_path)
    plain = Arc2FaceBase.from_pretrained(*tiny_base)
    load_expression_adapter(plain.unet, tmp_path)  # the official-format file: no scale needed to read it
    exp = torch.randn(3, 55)
    torch.testing.assert_close(plain.unet.encoder_hid_proj.image_projection_layers[0](exp), proj(exp))
    assert len(adapter_parameters(base.unet)) == len(adapter_parameters(plain.unet))


def test_input_scale_rejects_unknown_groups(tiny_base) -> None:
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    with pytest.raises(ValueError, match=r"unknown FLAME group\(s\) \['mouth'\]"):
        attach_expression_adapter(base.unet, input_scale={"mouth": 2.0})
    with pytest.raises(ValueError, match="must be positive"):
        attach_expression_adapter(base.unet, input_scale={"jaw": 0.0})


# The IP-Adapter projection formats diffusers' load_ip_adapter reads for a 55-d input, by their official keys.
FORMATS = {"linear": ({"num_tokens": 4, "projection": "linear"}, {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}),
           "full": ({"num_tokens": 1, "projection": "full"},
                    {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "proj.3.weight", "proj.3.bias"}),
           "faceid": ({"num_tokens": 3, "projection": "mlp", "mult": 2},
                      {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"})}


@pytest.mark.parametrize("form", sorted(FORMATS))
def test_fine_tuning_reads_and_writes_every_official_projection_format(tiny_base, tmp_path: Path, form: str) -> None:
    from blendexp.modules.expression import ExpressionAdapterModule

    cfg, keys = FORMATS[form]
    models, sd15 = tiny_base
    trained_like_adapter(tiny_base, tmp_path / "official", **cfg)
    official = torch.load(tmp_path / "official" / "exp_adapter.bin", weights_only=True)
    assert set(official["image_proj"]) == keys
    theirs = StableDiffusionPipeline.from_pretrained(
        sd15, unet=UNet2DConditionModel.from_pretrained(models, subfolder="arc2face"), safety_checker=None,
        text_encoder=Arc2FaceBase.from_pretrained(*tiny_base).text_encoder)
    theirs.load_ip_adapter(str(tmp_path), subfolder="official", weight_name="exp_adapter.bin", image_encoder_folder=None)
    module = ExpressionAdapterModule(base={"models": str(models), "sd15": str(sd15)}, adapter={}, noise={},
                                     dropout={}, optim={"lr": 1e-3}, init_adapter=str(tmp_path / "official"))
    assert module.hparams["adapter"] == cfg  # what the file holds, recorded for exports from its checkpoints
    assert type(module.unet.encoder_hid_proj.image_projection_layers[0]) is \
        type(theirs.unet.encoder_hid_proj.image_projection_layers[0])
    x, t, states, exp = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 512), torch.randn(2, 1, 55)
    torch.testing.assert_close(module.unet(x, t, states, added_cond_kwargs={"image_embeds": [exp]}).sample,
                               theirs.unet(x, t, states, added_cond_kwargs={"image_embeds": [exp]}).sample)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert any("to_k_ip" in n for n in before) == (cfg["num_tokens"] > 1)  # one token's keys are never read: frozen
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    module.forward_loss({"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "id": torch.randn(2, 512),
                         "exp": torch.randn(2, 55)}).backward()
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in module.named_parameters() if p.requires_grad)
    (tuned,) = [f for f in module.export(tmp_path / "tuned") if f.suffix == ".bin"]
    state = torch.load(tuned, weights_only=True)
    assert {k: v.shape for k, v in state["image_proj"].items()} == {k: v.shape for k, v in official["image_proj"].items()}
    theirs.load_ip_adapter(str(tuned.parent), subfolder="", weight_name=tuned.name, image_encoder_folder=None)
    torch.testing.assert_close(module.unet(x, t, states, added_cond_kwargs={"image_embeds": [exp]}).sample,
                               theirs.unet(x, t, states, added_cond_kwargs={"image_embeds": [exp]}).sample)


def test_an_image_adapter_is_refused_with_the_reason(tiny_base, tmp_path: Path) -> None:
    base = trained_like_adapter(tiny_base, tmp_path / "ad")
    state = torch.load(tmp_path / "ad" / "exp_adapter.bin", weights_only=True)
    cross = base.unet.config.cross_attention_dim
    state["image_proj"] = {"proj.weight": torch.randn(4 * cross, 1024), "proj.bias": torch.zeros(4 * cross),
                           "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}  # a CLIP-image adapter
    torch.save(state, tmp_path / "ad" / "exp_adapter.bin")
    (tmp_path / "ad" / "exp_adapter.safetensors").unlink()
    unet = Arc2FaceBase.from_pretrained(*tiny_base).unet
    before = {name: type(proc) for name, proc in unet.attn_processors.items()}
    with pytest.raises(ValueError, match="projects a 1024-d input .* reads the 55-d FLAME vector"):
        load_expression_adapter(unet, tmp_path / "ad")
    assert unet.encoder_hid_proj is None  # refused before anything was attached
    assert {name: type(proc) for name, proc in unet.attn_processors.items()} == before
