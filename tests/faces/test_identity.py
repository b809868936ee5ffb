"""Identity encoders: an exported toy recogniser round-trips through insightface's loader bit-for-bit in meaning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from blendexp.faces.identity import (
    ArcFaceONNX,
    FacenetRecognizer,
    IdentityEncoder,
    build_identity_encoder,
    export_arcface_onnx,
)


def _tiny_recogniser() -> nn.Module:
    """A small random CNN mapping (N, 3, 112, 112) to (N, 512); channel order matters to it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4), nn.ReLU(), nn.Conv2d(8, 32, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 512),
    ).eval()


def _torch_reference(module: nn.Module, crops: np.ndarray) -> np.ndarray:
    """What the recogniser should produce: RGB scaled as (x - 127.5) / 127.5, then unit-normalised."""
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() - 127.5) / 127.5
    with torch.no_grad():
        return nn.functional.normalize(module(x), dim=1).numpy()


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Random crops whose red and blue channels differ, so a BGR/RGB mix-up changes the embedding."""
    rng = np.random.default_rng(0)
    out = rng.integers(0, 256, size=(5, 112, 112, 3), dtype=np.uint8)
    out[..., 0] = out[..., 0] // 2 + 128  # bright red
    out[..., 2] = out[..., 2] // 4  # dark blue
    return out


def test_exported_recogniser_matches_torch(tmp_path: Path, crops: np.ndarray) -> None:
    module = _tiny_recogniser()
    path = export_arcface_onnx(module, tmp_path / "antelopev2" / "arcface.onnx")
    encoder = ArcFaceONNX(path, batch_size=2)  # several chunks, including a ragged last one
    assert isinstance(encoder, IdentityEncoder)
    emb = encoder.embed(crops)
    assert emb.shape == (5, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(emb, encoder.embed(crops))
    reference = _torch_reference(module, crops)
    np.testing.assert_allclose(emb, reference, atol=1e-5)
    # The same check is sensitive to channel order: BGR crops give clearly different vectors.
    swapped = _torch_reference(module, np.ascontiguousarray(crops[..., ::-1]))
    assert np.abs(emb - swapped).max() > 1e-2
    assert encoder.embed(crops[:0]).shape == (0, 512)


def test_worker_threads_cap_onnx_runtime(tmp_path: Path, crops: np.ndarray) -> None:
    path = export_arcface_onnx(_tiny_recogniser(), tmp_path / "arcface.onnx")
    capped = build_identity_encoder("arcface", path, threads=1)  # what a build worker asks for: one core
    assert capped.model.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(capped.embed(crops), ArcFaceONNX(path).embed(crops), atol=1e-6)


def test_export_rejects_wrong_output_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="512"):
        export_arcface_onnx(nn.Sequential(nn.Flatten(), nn.LazyLinear(128)), tmp_path / "bad.onnx")


def test_crops_must_be_uint8_112(tmp_path: Path) -> None:
    encoder = ArcFaceONNX(export_arcface_onnx(_tiny_recogniser(), tmp_path / "r.onnx"))
    with pytest.raises(ValueError, match="112"):
        encoder.embed(np.zeros((1, 128, 128, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encoder.embed(np.zeros((1, 112, 112, 3), np.float32))


def test_facenet_loads_a_local_vggface2_style_file(tmp_path: Path, crops: np.ndarray) -> None:
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(0)
    net = InceptionResnetV1(classify=True, num_classes=3)  # the real file also carries classifier weights
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(net.state_dict(), path)
    encoder = build_identity_encoder("facenet", path)
    assert isinstance(encoder, FacenetRecognizer)
    emb = encoder.embed(crops[:2])
    assert emb.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["arcface", "facenet"])
def test_missing_weights_name_the_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / "models" / "missing.file"
    with pytest.raises(FileNotFoundError, match=str(path)) as info:
        build_identity_encoder(name, path)
    assert ("glintr100" in str(info.value)) if name == "arcface" else ("vggface2" in str(info.value))


def test_unknown_encoder_name() -> None:
    with pytest.raises(ValueError, match="unknown identity encoder"):
        build_identity_encoder("vggface", "x")
