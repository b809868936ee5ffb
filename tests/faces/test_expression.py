"""SMIRK expression encoder: official key layout round trip, output ranges, crop geometry, annotator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blendexp.faces.detect import Face, MTCNNDetector
from blendexp.faces.expression import (
    SMIRK_PREFIX,
    SmirkAnnotator,
    SmirkExpressionEncoder,
    load_smirk,
    prepare_smirk_input,
    save_smirk_checkpoint,
)
from blendexp.flame import EXP_DIM, EYELIDS, JAW


@pytest.fixture(scope="module")
def encoder() -> SmirkExpressionEncoder:
    """A random SMIRK encoder whose head bias drives eyelids and jaw far past their clamp limits."""
    torch.manual_seed(0)
    model = SmirkExpressionEncoder().eval()
    with torch.no_grad():
        bias = model.expression_layers[0].bias
        bias[:50] = torch.randn(50) * 3.0
        bias[EYELIDS] = torch.tensor([20.0, -20.0])
        bias[JAW] = torch.tensor([-20.0, 20.0, -20.0])
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three random RGB inputs in [0, 1]; 96 px keeps CPU tests fast (the net is convolutional + global pool)."""
    return torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def test_checkpoint_round_trip_in_official_layout(
    tmp_path: Path, encoder: SmirkExpressionEncoder, images: torch.Tensor
) -> None:
    path = save_smirk_checkpoint(encoder, tmp_path / "smirk" / "SMIRK_em1.pt")
    raw = torch.load(path, weights_only=True)
    assert raw and all(k.startswith(SMIRK_PREFIX) for k in raw)
    # The official names: timm backbone under `encoder.`, linear head under `expression_layers.0.`.
    assert f"{SMIRK_PREFIX}encoder.conv_stem.weight" in raw
    assert raw[f"{SMIRK_PREFIX}expression_layers.0.weight"].shape == (EXP_DIM, 960)
    loaded = load_smirk(path)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), encoder(images), rtol=0, atol=0)


def test_outputs_respect_smirk_ranges(encoder: SmirkExpressionEncoder, images: torch.Tensor) -> None:
    with torch.no_grad():
        flame = encoder(images)
        parts = encoder.predict_params(images)
    assert flame.shape == (3, EXP_DIM)
    assert set(parts) == {"expression_params", "eyelid_params", "jaw_params"}
    torch.testing.assert_close(flame[:, EYELIDS], parts["eyelid_params"])
    # Eyelids clamp to [0, 1]; jaw opening is ReLU'd; the two sideways jaw rotations clamp to +-0.2.
    torch.testing.assert_close(flame[:, EYELIDS], torch.tensor([[1.0, 0.0]]).expand(3, 2))
    torch.testing.assert_close(flame[:, JAW], torch.tensor([[0.0, 0.2, -0.2]]).expand(3, 3))
    # Expression coefficients pass through the head unclamped.
    with torch.no_grad():
        raw = encoder.expression_layers(encoder.encoder(images)[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(flame[:, :50], raw[:, :50])
    assert flame[:, :50].abs().max() > 1.0


def test_missing_or_foreign_checkpoints_fail_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "smirk" / "SMIRK_em1.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_smirk(missing)
    foreign = tmp_path / "other.pt"
    torch.save({"smirk_generator.conv.weight": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match=f"{foreign}.*{SMIRK_PREFIX}"):
        load_smirk(foreign)


def test_crop_matches_smirk_geometry() -> None:
    image = np.zeros((400, 400, 3), np.uint8)
    image[100:200, 100:200] = 255  # a white square exactly filling the box below
    x = prepare_smirk_input(image, np.array([100.0, 100.0, 200.0, 200.0]))
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # side = int(100 * 1.4) = 140 around centre 150; the box edges 100 and 200 map to 223 * (20 / 140)
    # = 31.9 and 223 * (120 / 140) = 191.1, so the square covers columns 32..191.
    cols = np.nonzero(x[0, 0, 112].numpy() > 0.5)[0]
    assert abs(cols[0] - 32) <= 1 and abs(cols[-1] - 191) <= 1
    with pytest.raises(ValueError, match="box"):
        prepare_smirk_input(image, np.zeros((5, 2)))  # five points are too few to frame a face


def test_swap_rb_reproduces_arc2face_channel_order() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[..., 0] = 200
    box = np.array([10.0, 10.0, 50.0, 50.0])
    rgb = prepare_smirk_input(image, box)
    bgr = prepare_smirk_input(image, box, swap_rb=True)
    torch.testing.assert_close(bgr, rgb.flip(1))
    assert float(rgb[0, 0, 112, 112]) == pytest.approx(200 / 255)


def test_annotator_returns_none_for_faceless_images(
    mtcnn: MTCNNDetector, encoder: SmirkExpressionEncoder, astronaut_rgb: np.ndarray, astronaut_face: Face
) -> None:
    annotator = SmirkAnnotator(mtcnn, encoder)
    blank = np.full((128, 128, 3), 90, np.uint8)
    out = annotator.annotate([blank, astronaut_rgb])
    assert out[0] is None
    assert out[1] is not None and out[1].shape == (EXP_DIM,) and out[1].dtype == np.float32
    # Passing known detections skips the detector and gives the same vector.
    reused = annotator.annotate([astronaut_rgb], faces=[astronaut_face])
    np.testing.assert_allclose(reused[0], out[1], atol=1e-6)
    assert annotator.annotate([]) == []
