"""Toy annotators and VAE: crops identical to the evaluator's, honest metrics, real export formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blendexp.faces.align import arcface_crop
from blendexp.faces.annotators import AlignedFaces
from blendexp.faces.expression import SmirkExpressionEncoder, prepare_smirk_input
from blendexp.faces.identity import ArcFaceONNX, export_arcface_onnx
from blendexp.toyworld.annotators import (
    ToyFaceNet,
    _raw_flame,
    identity_crops,
    roc_auc,
    shrink,
    shrink_all,
    smirk_inputs,
    verification_metrics,
)
from blendexp.toyworld.autoencoder import face_weights, psnr, set_scaling_factor, to_pixels, toy_vae
from blendexp.toyworld.params import sample_expression, sample_identity, sample_nuisance
from blendexp.toyworld.render import region_masks, render_face


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """Three 128 px toy faces under random conditions."""
    rng = np.random.default_rng(0)
    return np.stack([np.asarray(render_face(sample_identity(rng), sample_expression(rng), sample_nuisance(rng), 128))
                     for _ in range(3)])


@pytest.mark.parametrize("small", [False, True])
def test_crops_are_the_evaluators_crops(faces: np.ndarray, small: bool) -> None:
    # Training on other crops than the evaluator's would make the exported encoders measure something else.
    images = [shrink(im) for im in faces] if small else list(faces)
    det = AlignedFaces()
    expected = np.stack([arcface_crop(im, det.detect(im)[0].landmarks5) for im in images])
    np.testing.assert_array_equal(identity_crops(images), expected)
    expected_smirk = torch.cat([prepare_smirk_input(im, det.detect(im)[0].bbox) for im in images])
    torch.testing.assert_close(smirk_inputs(images), expected_smirk, rtol=0, atol=0)
    assert identity_crops(images).shape == (3, 112, 112, 3) and smirk_inputs(images).shape == (3, 3, 224, 224)


def test_roc_auc_matches_pair_counting() -> None:
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(0.5, 1, 50), rng.normal(0, 1, 70)
    brute = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert roc_auc(pos, neg) == pytest.approx(brute)


def test_verification_metrics_separate_informative_from_random_embeddings() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 4)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    clustered = unit(unit(rng.normal(size=(20, 512)))[labels] + 0.02 * rng.normal(size=(80, 512)))
    good = verification_metrics(clustered, labels)
    assert good["roc_auc"] == 1.0 and good["verification_accuracy"] == 1.0
    chance = verification_metrics(unit(rng.normal(size=(80, 512))), labels)
    assert 0.35 < chance["roc_auc"] < 0.65 and 0.35 < chance["verification_accuracy"] < 0.65


def test_toy_recogniser_exports_with_arcface_signature(tmp_path: Path, faces: np.ndarray) -> None:
    torch.manual_seed(0)
    net = ToyFaceNet(width=8).eval()
    encoder = ArcFaceONNX(export_arcface_onnx(net, tmp_path / "arcface.onnx"))  # insightface's own loader
    crops = identity_crops(faces)
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(x)).numpy()
    np.testing.assert_allclose(encoder.embed(crops), expected, atol=1e-4)
    assert encoder.model.input_shape[1:] == [3, 112, 112] and encoder.model.output_shape[-1] == 512


def test_raw_outputs_are_smirks_outputs_before_its_clamps(faces: np.ndarray) -> None:
    # Training fits the raw head output; SMIRK's forward must be exactly those values after its activations.
    torch.manual_seed(0)
    model = SmirkExpressionEncoder().eval()
    with torch.no_grad():
        model.expression_layers[0].bias.copy_(torch.linspace(-2, 2, 55))  # push some values past the clamps
        x = smirk_inputs(faces[:2])
        raw, out = _raw_flame(model, x), model(x)
    expected = torch.cat([raw[:, :50], raw[:, 50:52].clamp(0, 1), raw[:, 52:53].relu(), raw[:, 53:].clamp(-0.2, 0.2)],
                         dim=1)
    torch.testing.assert_close(out, expected)


def test_vae_scaling_factor_whitens_its_latents(faces: np.ndarray, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = toy_vae(width=8).eval()
    small = shrink_all(faces)
    factor = set_scaling_factor(vae, small, seed=0)
    with torch.no_grad():
        latents = vae.encode(to_pixels(small)).latent_dist.sample(torch.Generator().manual_seed(0))
    assert latents.shape == (3, 4, 8, 8)  # SD's 8x downsampling and 4 channels
    assert float((latents * factor).std()) == pytest.approx(1.0, rel=1e-4)
    vae.save_pretrained(tmp_path / "vae")
    from diffusers import AutoencoderKL

    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.scaling_factor == pytest.approx(factor)


def test_psnr_values() -> None:
    a = np.zeros((3, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1], b[2] = 1, 255
    values = psnr(a, b)
    assert values[0] > 100  # identical images: capped by the MSE floor, not inf
    np.testing.assert_allclose(values[1:], [10 * np.log10(255.0**2), 0.0])


def test_vae_face_weights_favour_every_expression_region() -> None:
    # The weights must sit on what the expression moves (brows, eyes, nose, mouth) for any toy person; a centre
    # placed on the forehead or the shirt would spend the VAE on the wrong pixels. The brows, raised to clear the
    # larger eyes (6798845), average 1.29-1.39 over these five faces, the pixels outside the face 0.73-0.75.
    w = face_weights(64, 4.0).numpy()
    assert w.mean() == pytest.approx(1.0) and np.allclose(face_weights(64, 0.0).numpy(), 1.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        masks = region_masks(sample_identity(rng), 64)
        face = np.any([masks[r] for r in ("brows", "left_eye", "right_eye", "nose", "mouth")], axis=0)
        assert all(w[masks[r]].mean() > 1.5 for r in ("left_eye", "right_eye", "mouth", "nose"))
        assert w[masks["brows"]].mean() > 1.25 and w[face].mean() > 2 * w[~face].mean()

