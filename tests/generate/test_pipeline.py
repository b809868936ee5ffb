"""ExpressionPipeline: the same images as plain diffusers, per-expression conditioning, shared noise, reference mode,
identity and expression readers, and the official layout's defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from skimage.data import astronaut
from PIL import Image

from blendexp.flame import preset
from blendexp.models.arc2face import Arc2FaceTextEncoder, id_prompt_embeds
from blendexp.models.expression_adapter import expression_embeds
from blendexp.pipeline import ExpressionPipeline
from tests.generate.conftest import SAMPLE_SHARD

ID = np.random.default_rng(0).normal(size=512).astype(np.float32)
KW = dict(steps=3, size=64)


def diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute pixel difference."""
    return float(np.abs(a.astype(float) - b).mean())


def test_same_images_as_a_plain_diffusers_pipeline(pipe: ExpressionPipeline, tiny_base, exp_adapter: Path) -> None:
    models, sd15 = tiny_base
    plain = StableDiffusionPipeline.from_pretrained(
        sd15, unet=UNet2DConditionModel.from_pretrained(models, subfolder="arc2face"),
        text_encoder=Arc2FaceTextEncoder.from_pretrained(models, subfolder="encoder"), safety_checker=None)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config)
    plain.load_ip_adapter(str(exp_adapter), subfolder="", weight_name="exp_adapter.bin", image_encoder_folder=None)
    plain.set_progress_bar_config(disable=True)
    exp = preset("smile")
    prompt = id_prompt_embeds(plain.text_encoder, plain.tokenizer, torch.from_numpy(ID)[None])
    theirs = plain(prompt_embeds=prompt, ip_adapter_image_embeds=expression_embeds(torch.from_numpy(exp)[None], True),
                   num_inference_steps=3, guidance_scale=3.0, height=64, width=64, num_images_per_prompt=2,
                   generator=[torch.Generator().manual_seed(k) for k in (5, 6)], output_type="np").images
    ours = pipe(ID, exp, num_images=2, seed=5, **KW)
    np.testing.assert_array_equal(ours, (theirs * 255).round().astype(np.uint8))
    assert isinstance(pipe.pipe, StableDiffusionPipeline)
    # a negative expression is the unconditional half of the embeddings diffusers is given, nothing else
    negative = torch.from_numpy(preset("surprise"))
    theirs = plain(prompt_embeds=prompt, num_inference_steps=3, guidance_scale=3.0, height=64, width=64,
                   ip_adapter_image_embeds=expression_embeds(torch.from_numpy(exp)[None], True, negative),
                   generator=[torch.Generator().manual_seed(5)], output_type="np").images
    guided = pipe(ID, exp, seed=5, negative_expression="surprise", **KW)
    np.testing.assert_array_equal(guided, (theirs * 255).round().astype(np.uint8))
    assert diff(guided[0], ours[0]) > 0.5


def test_negative_expression_defaults_to_zeros_and_takes_one_vector(pipe: ExpressionPipeline, tmp_path: Path) -> None:
    zeros = np.zeros(55, np.float32)
    np.testing.assert_array_equal(pipe(ID, preset("smile"), negative_expression=zeros, **KW),
                                  pipe(ID, preset("smile"), **KW))
    np.save(tmp_path / "two.npy", np.stack([zeros, preset("smile")]))
    with pytest.raises(ValueError, match="gives 2 FLAME vectors; give exactly one"):
        pipe(ID, preset("smile"), negative_expression=str(tmp_path / "two.npy"), **KW)


def test_every_expression_gets_its_own_tokens_and_the_same_noise(pipe: ExpressionPipeline) -> None:
    exps = [preset("neutral"), preset("surprise"), preset("smile")]
    grid = pipe(ID, exps, num_images=2, seed=3, **KW)  # rows: e * 2 + k, seed 3 + k
    assert grid.shape == (6, 64, 64, 3)
    for e, exp in enumerate(exps):  # a batch never mixes expressions (diffusers broadcasts adapter embeddings)
        np.testing.assert_array_equal(grid[2 * e:2 * e + 2], pipe(ID, exp, num_images=2, seed=3, **KW))
    one_by_one = pipe(ID, exps, num_images=2, seed=3, batch_size=1, **KW)
    assert np.abs(one_by_one.astype(int) - grid).max() <= 1  # batching changes float rounding only
    assert diff(grid[0], grid[2]) > 0.5  # the expression changes the image ...
    assert diff(grid[0], grid[2]) < diff(grid[0], grid[1])  # ... less than another seed does: same noise per column


def test_transition_frames_share_one_initial_noise(pipe: ExpressionPipeline) -> None:
    frames = pipe.transition(ID, [preset("neutral"), preset("surprise")], frames=5, seed=1, **KW)
    np.testing.assert_array_equal(frames[0], pipe(ID, preset("neutral"), seed=1, **KW)[0])
    np.testing.assert_array_equal(frames[-1], pipe(ID, preset("surprise"), seed=1, **KW)[0])
    steps = [diff(a, b) for a, b in zip(frames[:-1], frames[1:])]
    assert max(steps) < diff(frames[0], frames[-1])  # gradual: no jump as large as the whole change
    still = pipe.transition(ID, [preset("smile"), preset("smile")], frames=3, seed=1, **KW)
    assert all(np.array_equal(still[0], f) for f in still)


def test_expression_scale_zero_is_arc2face_alone(pipe: ExpressionPipeline) -> None:
    off = pipe(ID, [preset("neutral"), preset("surprise")], expression_scale=0.0, **KW)
    np.testing.assert_array_equal(off[0], off[1])
    on = pipe(ID, [preset("neutral"), preset("surprise")], **KW)  # the scale is restored per call
    assert diff(on[0], on[1]) > 0.5


def test_reference_mode(pipe: ExpressionPipeline, tiny_base, exp_adapter: Path, face_png: Path) -> None:
    with pytest.raises(ValueError, match="needs the Reference Adapter"):
        pipe(ID, preset("smile"), np.zeros((64, 64, 3), np.uint8), **KW)
    ref_pipe = ExpressionPipeline.from_pretrained(*tiny_base, expression_adapter=exp_adapter, reference_adapter=True)
    assert ref_pipe.sources["reference_adapter"] == "untrained (seed 0)"
    reference = np.asarray(Image.open(face_png))
    without = ref_pipe(ID, preset("smile"), None, **KW)
    np.testing.assert_array_equal(without, pipe(ID, preset("smile"), **KW))  # no reference: LoRA off, plain attention
    with_ref = ref_pipe(ID, preset("smile"), reference, **KW)
    assert diff(with_ref[0], without[0]) > 0.5


def test_identity_and_expression_from_photos(pipe: ExpressionPipeline, face_png: Path, blank_png: Path,
                                             tiny_annotators: Path, tmp_path: Path) -> None:
    face = pipe.load_identity(face_png)
    assert face.image.shape == (64, 64, 3) and np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    shard_face = pipe.load_identity(SAMPLE_SHARD)
    np.testing.assert_allclose(shard_face.embedding, face.embedding, atol=1e-5)  # the shards' first face is that PNG
    assert pipe.expression_from_image(face_png).shape == (55,)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).save(photo)
    real = ExpressionPipeline(pipe.pipe, annotators={"tiny_root": str(tiny_annotators), "detector": "mtcnn"})
    found = real.identity_from_image(photo, size=128)  # detected, FFHQ-aligned, ArcFace-embedded
    assert found.image.shape == (128, 128, 3) and found.origin == str(photo)
    for read in (real.identity_from_image, real.expression_from_image):
        with pytest.raises(ValueError, match=f"no face found in {blank_png}"):
            read(blank_png)
    bad = tmp_path / "id.npy"
    np.save(bad, np.zeros(511, np.float32))
    with pytest.raises(ValueError, match="identity embedding in .*id.npy has 511 values; 512 values are expected"):
        pipe.load_identity(bad)


def test_official_layout_supplies_the_adapter(tiny_base, exp_adapter: Path, tmp_path: Path) -> None:
    models, sd15 = tiny_base
    for sub in ("arc2face", "encoder"):
        (tmp_path / sub).symlink_to(models / sub)
    (tmp_path / "exp_adapter").symlink_to(exp_adapter)
    loaded = ExpressionPipeline.from_pretrained(tmp_path, sd15, scheduler="ddim")
    assert loaded.sources["expression_adapter"] == str(tmp_path / "exp_adapter")
    assert loaded.sources["scheduler"] == "DDIMScheduler"
    assert loaded.annotator_cfg["smirk"] == str(tmp_path / "smirk" / "SMIRK_em1.pt")
    with pytest.raises(ValueError, match="unknown scheduler 'fast'"):
        loaded.set_scheduler("fast")
