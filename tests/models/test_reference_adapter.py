"""Reference Adapter: write/read processors, CFG rows, LoRA, export → plain diffusers ``load_lora_weights``, import."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from blendexp.models.adapters import adapter_pipeline
from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.expression_adapter import (
    attach_expression_adapter,
    expression_embeds,
    load_expression_adapter,
    save_expression_adapter,
)
from blendexp.models.reference_adapter import (
    REFERENCE_KWARG,
    ReferenceStore,
    add_reference_lora,
    add_reference_reader,
    encode_reference,
    generate_with_reference,
    load_reference_lora,
    record_reference,
    reference_lora_parameters,
    reference_unet,
    save_reference_lora,
)


@pytest.fixture
def unet(tiny_base) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_base[0], subfolder="arc2face")


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.full((n,), 500), torch.randn(n, 77, 512, generator=g)


def call(unet: UNet2DConditionModel, x, t, states, store: ReferenceStore | None = None, **kw) -> torch.Tensor:
    kwargs = {REFERENCE_KWARG: store} if store is not None else None
    with torch.no_grad():
        return unet(x, t, states, cross_attention_kwargs=kwargs, **kw).sample


def perturb_lora(unet: UNet2DConditionModel, seed: int = 0) -> None:
    """Give the LoRA non-zero B matrices, as training would."""
    torch.manual_seed(seed)
    for p in reference_lora_parameters(unet):
        p.data.add_(torch.randn_like(p) * 0.1)


def test_read_without_recordings_is_plain_self_attention(unet) -> None:
    reader = copy.deepcopy(unet)
    add_reference_reader(reader)
    x, t, s = inputs(2)
    plain = call(unet, x, t, s)
    assert torch.equal(call(reader, x, t, s), plain)
    assert torch.equal(call(reader, x, t, s, ReferenceStore()), plain)


def test_reading_own_recording_is_identity_layer_by_layer(unet) -> None:
    # Keys/values [h, h] give the same attention output as [h]: exact only if every layer reads its own input.
    reader, ref_unet = copy.deepcopy(unet), reference_unet(unet)
    add_reference_reader(reader)
    x, _, s = inputs(2)
    t0 = torch.zeros(2, dtype=torch.long)
    store = record_reference(ref_unet, x, s)
    assert len(store.states) == sum(k.endswith("attn1.processor") for k in unet.attn_processors)
    torch.testing.assert_close(call(reader, x, t0, s, store), call(unet, x, t0, s))
    other, _, _ = inputs(2, seed=1)
    assert (call(reader, other, t0, s, store) - call(unet, other, t0, s)).abs().max() > 1e-3


def test_reference_changes_conditional_half_only(unet) -> None:
    reader, ref_unet = copy.deepcopy(unet), reference_unet(unet)
    add_reference_reader(reader)
    x, t, s = inputs(4)
    ref_latents, _, _ = inputs(2, seed=3)
    rows = torch.tensor([False, False, True, True])  # the pipeline's CFG batch: [uncond, cond]
    store = record_reference(ref_unet, ref_latents, s[2:]).expand(read_rows=rows)
    out, plain = call(reader, x, t, s, store), call(unet, x, t, s)
    torch.testing.assert_close(out[:2], plain[:2])
    assert (out[2:] - plain[2:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    with pytest.raises(ValueError, match="selects 1 rows but the store holds 2"):
        store.expand(read_rows=torch.tensor([False, False, False, True]))


def test_reads_next_to_expression_adapter_and_lora_without_warnings(unet) -> None:
    ref_unet = reference_unet(unet)
    attach_expression_adapter(unet)
    add_reference_lora(unet, rank=4, alpha=4)
    perturb_lora(unet)
    add_reference_reader(unet)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("diffusers.models.attention_processor")
    logger.addHandler(handler)
    try:
        x, t, s = inputs(2)
        exp = {"added_cond_kwargs": {"image_embeds": [torch.randn(2, 1, 55)]}}
        store = record_reference(ref_unet, inputs(2, seed=5)[0], s)
        with_ref, without = call(unet, x, t, s, store, **exp), call(unet, x, t, s, **exp)
        assert (with_ref - without).abs().max() > 1e-3
        assert not [r for r in records if "not expected" in r.getMessage()]
        unet(x, t, s, cross_attention_kwargs={REFERENCE_KWARG: store, "bogus": 1}, **exp)
        assert any("bogus" in r.getMessage() for r in records)  # other unused kwargs are still reported
    finally:
        logger.removeHandler(handler)
    assert all(p.grad is None and p.requires_grad for p in reference_lora_parameters(unet))
    assert not any(p.requires_grad for p in ref_unet.parameters())


def test_reference_unet_must_be_plain_base(unet) -> None:
    add_reference_lora(unet)
    with pytest.raises(ValueError, match="plain base UNet"):
        reference_unet(unet)


def plain_pipeline(tiny_base, base: Arc2FaceBase, exp_folder: Path) -> StableDiffusionPipeline:
    """A diffusers pipeline as a user builds it, with the Expression Adapter loaded the official way."""
    models, sd15 = tiny_base
    pipe = StableDiffusionPipeline.from_pretrained(
        sd15, text_encoder=base.text_encoder, unet=UNet2DConditionModel.from_pretrained(models, subfolder="arc2face"),
        safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(exp_folder), subfolder="", weight_name="exp_adapter.bin", image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trained_like(tiny_base, folder: Path, rank: int = 4, alpha: float = 8) -> tuple[Arc2FaceBase, UNet2DConditionModel]:
    """Expression Adapter and LoRA perturbed as training would, exported to ``folder``/{exp,ref}_adapter."""
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    ref_unet = reference_unet(base.unet)
    torch.manual_seed(0)
    for p in attach_expression_adapter(base.unet):
        p.data.add_(torch.randn_like(p) * 0.05)
    save_expression_adapter(base.unet, folder / "exp_adapter")
    add_reference_lora(base.unet, rank=rank, alpha=alpha)
    perturb_lora(base.unet)
    save_reference_lora(base.unet, folder / "ref_adapter")
    return base, ref_unet


def test_export_runs_in_plain_diffusers_reference_mode(tiny_base, tmp_path: Path) -> None:
    base, ref_unet = trained_like(tiny_base, tmp_path)
    pipe, no_lora = plain_pipeline(tiny_base, base, tmp_path / "exp_adapter"), plain_pipeline(tiny_base, base, tmp_path / "exp_adapter")
    pipe.load_lora_weights(str(tmp_path / "ref_adapter"), adapter_name="ref")
    pipe.set_adapters(["ref"], [0.8])
    prompt = id_prompt_embeds(base.text_encoder, base.tokenizer, torch.randn(1, 512))
    reference = torch.rand(1, 3, 64, 64) * 2 - 1
    calls = []
    ref_unet.register_forward_hook(lambda *_: calls.append(1))

    def run(p: StableDiffusionPipeline, ref: torch.Tensor | None, **kw) -> torch.Tensor:
        return generate_with_reference(
            p, ref_unet, ref, prompt, num_inference_steps=4, height=64, width=64, output_type="pt",
            ip_adapter_image_embeds=expression_embeds(torch.ones(1, 55), True),
            generator=torch.Generator().manual_seed(0), **kw).images

    base_image = run(no_lora, None, lora_scale=None)
    torch.testing.assert_close(run(pipe, None), base_image)  # no reference: LoRA scale 0 is the base model
    assert not calls
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    at_08 = run(pipe, reference)
    assert calls == [1]  # once per image, not once per denoising step
    # the LoRA is merged into the weights for the call only: restored bit for bit, so calls repeat exactly
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(run(pipe, reference), at_08)
    # and merged it computes what the LoRA computes beside the weights at every step
    store = record_reference(ref_unet, encode_reference(pipe.vae, reference), prompt).expand(1, slice(1, 2))
    unmerged = pipe(prompt_embeds=prompt, num_inference_steps=4, guidance_scale=3.0, height=64, width=64,
                    output_type="pt", ip_adapter_image_embeds=expression_embeds(torch.ones(1, 55), True),
                    generator=torch.Generator().manual_seed(0), cross_attention_kwargs={REFERENCE_KWARG: store}).images
    torch.testing.assert_close(at_08, unmerged, atol=1e-4, rtol=0)
    calls.clear()
    assert (at_08 - base_image).abs().max() > 1e-3
    assert (run(pipe, reference, lora_scale=0.4) - at_08).abs().max() > 1e-3
    other = torch.rand(1, 3, 64, 64) * 2 - 1
    assert (run(pipe, other) - at_08).abs().max() > 1e-3
    two = run(pipe, reference, num_images_per_prompt=2)
    assert two.shape[0] == 2 and calls == [1, 1, 1]


def test_import_matches_training_unet_and_diffusers_loader(tiny_base, tmp_path: Path) -> None:
    trained, _ = trained_like(tiny_base, tmp_path / "models", rank=4, alpha=8)
    base = Arc2FaceBase.from_pretrained(*tiny_base)
    pipe, _ = adapter_pipeline(base, DPMSolverMultistepScheduler.from_config(base.scheduler.config),
                               tmp_path / "models" / "exp_adapter", tmp_path / "models" / "ref_adapter")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    x, t, s = inputs(2)
    exp = {"added_cond_kwargs": {"image_embeds": [torch.randn(2, 1, 55)]}}
    torch.testing.assert_close(call(pipe.unet, x, t, s, **exp), call(trained.unet, x, t, s, **exp))
    # A file read without its rank/alpha metadata (as diffusers 0.29.2, the official release's pin, reads it) loads
    # with alpha = rank; alpha 8 at rank 4 was folded into the weights, so it still computes the trained LoRA.
    file = tmp_path / "models" / "ref_adapter" / "pytorch_lora_weights.safetensors"
    save_file(load_file(file), tmp_path / "bare.safetensors")
    unet = UNet2DConditionModel.from_pretrained(tiny_base[0], subfolder="arc2face")
    load_expression_adapter(unet, tmp_path / "models")
    config = load_reference_lora(unet, tmp_path / "bare.safetensors")
    assert (config.r, config.lora_alpha) == (4, 4)
    assert sorted(config.target_modules) == ["to_k", "to_out.0", "to_q", "to_v"]
    torch.testing.assert_close(call(unet, x, t, s, **exp), call(trained.unet, x, t, s, **exp))


def test_missing_lora_names_path(unet, tmp_path: Path) -> None:
    missing = f"{tmp_path} \\(nor in .*\\); give a pytorch_lora_weights.safetensors file"
    with pytest.raises(FileNotFoundError, match=missing):
        load_reference_lora(unet, tmp_path)
