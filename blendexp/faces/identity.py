"""Identity embeddings: any ArcFace-style ONNX through insightface's loader, or facenet-pytorch's InceptionResnetV1.

All encoders take ArcFace-aligned crops (N, 112, 112, 3) uint8 RGB (see ``align.arcface_crop``)
and return (N, 512) float32 L2-normalised vectors, the ``id.npy`` of the shard contract.
Weights are never downloaded here: a missing file raises with where to get it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from blendexp.checkpoints import load_weights_only
from blendexp.faces.align import ARCFACE_SIZE
from blendexp.faces.detect import ort_session_kwargs
from blendexp.flame import ID_DIM

logger = logging.getLogger(__name__)

ARCFACE_HINT = (
    "use antelopev2's glintr100.onnx (insightface model zoo) or Arc2Face's models/antelopev2/arcface.onnx "
    "(Hugging Face FoivosPar/Arc2Face)"
)
FACENET_HINT = (
    "download facenet-pytorch's VGGFace2 weights 20180402-114759-vggface2.pt from "
    "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/20180402-114759-vggface2.pt"
)
ARCFACE_INPUT_NAME = "input.1"  # the input name insightface's own recognition ONNX files use
FACENET_SIZE = 160  # InceptionResnetV1 was trained on 160 px crops


@runtime_checkable
class IdentityEncoder(Protocol):
    """Anything that embeds aligned crops; lets evaluation swap ArcFace for another recogniser via config."""

    def embed(self, crops112: np.ndarray) -> np.ndarray:
        """Map (N, 112, 112, 3) uint8 RGB crops to (N, 512) float32 unit vectors."""
        ...


def _check_crops(crops112: np.ndarray) -> np.ndarray:
    """Reject anything but a uint8 RGB batch of 112 px crops, the one input convention of this module."""
    crops = np.asarray(crops112)
    if crops.ndim != 4 or crops.shape[1:] != (ARCFACE_SIZE, ARCFACE_SIZE, 3) or crops.dtype != np.uint8:
        raise ValueError(
            f"expected crops of shape (N, {ARCFACE_SIZE}, {ARCFACE_SIZE}, 3) uint8 RGB, got {crops.shape} {crops.dtype}"
        )
    return crops


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit-normalise rows so cosine similarity is a dot product, as Arc2Face expects."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _require_file(path: str | Path, what: str, hint: str) -> Path:
    """Fail early with the path and where to get the real weights."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} weights not found at {p}; {hint}")
    return p


class ArcFaceONNX:
    """An insightface recognition ONNX (1x3x112x112 -> 512) loaded and preprocessed by insightface itself."""

    def __init__(self, path: str | Path, batch_size: int = 32, device: str = "cpu", threads: int | None = None):
        """Load through ``insightface.model_zoo.get_model`` so its normalisation rules apply unchanged."""
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX as InsightArcFace

        self.path = _require_file(path, "ArcFace ONNX", ARCFACE_HINT)
        model = get_model(str(self.path), **ort_session_kwargs(device, threads))
        if not isinstance(model, InsightArcFace):
            raise ValueError(f"{self.path} is not a recognition model for insightface (loaded {model!r})")
        out_dim = model.output_shape[-1]
        if isinstance(out_dim, int) and out_dim != ID_DIM:
            raise ValueError(f"{self.path} outputs {out_dim}-d embeddings; Arc2Face needs {ID_DIM}")
        fixed_batch = model.input_shape[0]
        self.batch_size = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else int(batch_size)
        self.model = model
        logger.info("ArcFace ONNX %s (input mean/std %.1f/%.1f)", self.path, model.input_mean, model.input_std)

    def embed(self, crops112: np.ndarray) -> np.ndarray:
        """Embed RGB crops; insightface's ``get_feat`` wants BGR (it swaps to RGB and normalises itself)."""
        crops = _check_crops(crops112)
        out = np.zeros((len(crops), ID_DIM), dtype=np.float32)
        for start in range(0, len(crops), self.batch_size):
            chunk = [np.ascontiguousarray(c[:, :, ::-1]) for c in crops[start : start + self.batch_size]]
            out[start : start + len(chunk)] = self.model.get_feat(chunk).reshape(len(chunk), -1)
        return _l2_normalise(out)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from safetensors or a plain ``torch.save`` file without unpickling code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


class FacenetRecognizer:
    """facenet-pytorch's InceptionResnetV1 (VGGFace2) from a local file: a second, independent identity metric."""

    def __init__(self, weights_path: str | Path, batch_size: int = 32, device: str = "cpu"):
        """Build the network without its classifier and load local weights (the classifier's keys are dropped)."""
        from facenet_pytorch import InceptionResnetV1

        self.path = _require_file(weights_path, "facenet InceptionResnetV1", FACENET_HINT)
        state = {k: v for k, v in _load_state_dict(self.path).items() if not k.startswith("logits.")}
        self.model = InceptionResnetV1(pretrained=None, classify=False)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{self.path} does not match InceptionResnetV1: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; {FACENET_HINT}"
            )
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def embed(self, crops112: np.ndarray) -> np.ndarray:
        """Embed RGB crops resized to 160 px with facenet's fixed standardisation ((x - 127.5) / 128)."""
        crops = _check_crops(crops112)
        out = np.zeros((len(crops), ID_DIM), dtype=np.float32)
        for start in range(0, len(crops), self.batch_size):
            chunk = np.ascontiguousarray(crops[start : start + self.batch_size])
            x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float()
            x = nn.functional.interpolate(x, size=(FACENET_SIZE, FACENET_SIZE), mode="bilinear", align_corners=False)
            out[start : start + len(x)] = self.model((x - 127.5) / 128.0).cpu().numpy()
        return _l2_normalise(out)


def build_identity_encoder(name: str, path: str | Path, device: str = "cpu",
                           threads: int | None = None) -> IdentityEncoder:
    """Build the identity encoder named in the config: ``arcface`` (ONNX) or ``facenet`` (state dict, torch threads)."""
    if name == "arcface":
        return ArcFaceONNX(path, device=device, threads=threads)
    if name == "facenet":
        return FacenetRecognizer(path, device=device)
    raise ValueError(f"unknown identity encoder {name!r}; choose 'arcface' or 'facenet'")


def export_arcface_onnx(module: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Export with arcface.onnx's signature so insightface runs it; input is (N, 3, 112, 112) RGB as (x-127.5)/127.5."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param = next(module.parameters(), None)
    example = torch.zeros(2, 3, ARCFACE_SIZE, ARCFACE_SIZE, device=param.device if param is not None else "cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            shape = tuple(module(example).shape)
        if shape != (2, ID_DIM):
            raise ValueError(f"module maps (2, 3, 112, 112) to {shape}; a recogniser must give (2, {ID_DIM})")
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated but needs no onnxscript, which this project does not ship.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[ARCFACE_INPUT_NAME],
                output_names=["embedding"],
                dynamic_axes={ARCFACE_INPUT_NAME: {0: "batch"}, "embedding": {0: "batch"}},
                opset_version=opset,
            )
    finally:
        module.train(was_training)
    return path
