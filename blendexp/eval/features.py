"""Image features for FID and KID: the FID Inception network from a local weights file, or an injected module.

``FIDInceptionV3`` rebuilds the TensorFlow FID Inception (as pytorch-fid ports it: torchvision's Inception v3 with
1008 classes and TF's pooling in the mixed blocks) so that ``pt_inception-2015-12-05-6726825d.pth`` loads strictly
without torch-fidelity and without a download. ``PixelFeatures`` is a fixed random projection of small pixels:
cheap and deterministic, for tests and the tiny world. Any ``nn.Module`` mapping (N, 3, H, W) in [0, 1] to (N, D)
can be configured instead (``_target_``), e.g. a network trained on the toy world.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from blendexp.checkpoints import load_weights_only

log = logging.getLogger(__name__)

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_INPUT_SIZE = 299


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool, which leaves padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(InceptionA):
    """InceptionA with TF's average pool."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same branches as torchvision, TF pooling in the pool branch."""
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionC(InceptionC):
    """InceptionC with TF's average pool."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same branches as torchvision, TF pooling in the pool branch."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        return [self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))]


class _FIDInceptionE(InceptionE):
    """InceptionE with TF's pooling: an average pool without padding in Mixed_7b, a max pool in Mixed_7c."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same branches as torchvision, TF pooling in the pool branch."""
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return [self.branch1x1(x), b3, b3d, self.branch_pool(pooled)]


class FIDInceptionV3(nn.Module):
    """The FID Inception: (N, 3, H, W) in [0, 1] → (N, 2048) pool features, images resized to 299 px first."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (_FIDInceptionA(192, 32), _FIDInceptionA(256, 64),
                                                    _FIDInceptionA(288, 64))
        net.Mixed_6b, net.Mixed_6c = _FIDInceptionC(768, 128), _FIDInceptionC(768, 160)
        net.Mixed_6d, net.Mixed_6e = _FIDInceptionC(768, 160), _FIDInceptionC(768, 192)
        net.Mixed_7b, net.Mixed_7c = _FIDInceptionE(1280, max_pool=False), _FIDInceptionE(2048, max_pool=True)
        self.net = net.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool features of images in [0, 1], scaled to [-1, 1] as the TF graph expects."""
        n = self.net
        x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False) * 2 - 1
        x = F.max_pool2d(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e,
                      n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def load_fid_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception with its weights from a local file; a missing or foreign file fails saying where to get it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception weights not found at {path}; download {FID_WEIGHTS_URL} there "
                                f"(or set eval.fid.inception_weights to where it is)")
    state = load_weights_only(path)
    model = FIDInceptionV3()
    try:
        model.net.load_state_dict(state)
    except (RuntimeError, AttributeError) as err:
        raise ValueError(f"{path} is not the FID Inception state dict ({FID_WEIGHTS_NAME}): {err}") from err
    log.info("FID Inception weights %s", path)
    return model


class PixelFeatures(nn.Module):
    """A fixed random projection of ``size`` px thumbnails: a deterministic stand-in for Inception in tests."""

    def __init__(self, dim: int = 64, size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.size, self.num_features = size, dim
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(3 * size * size, dim, generator=gen) / (3 * size * size) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] → (N, dim)."""
        thumb = F.interpolate(x, size=(self.size, self.size), mode="area")
        return thumb.flatten(1) @ self.proj


def build_feature_extractor(cfg: Mapping[str, Any]) -> nn.Module:
    """``extractor``: ``inception`` (weights from ``inception_weights``), ``pixels``, or a mapping with ``_target_``."""
    kind = cfg.get("extractor", "inception")
    if isinstance(kind, Mapping):
        return instantiate(kind).eval()
    if kind == "inception":
        return load_fid_inception(cfg["inception_weights"])
    if kind == "pixels":
        return PixelFeatures().eval()
    raise ValueError(f"unknown eval.fid.extractor {kind!r}; use inception, pixels or a mapping with _target_")


@torch.no_grad()
def image_features(module: nn.Module, images: Sequence[np.ndarray], device: str = "cpu") -> torch.Tensor:
    """Features (N, D) of uint8 RGB images; images of another size than the first are resized to it."""
    if not images:
        return torch.zeros(0, int(getattr(module, "num_features", 0)))
    h, w = images[0].shape[:2]
    batch = []
    for img in images:
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None] / 255.0
        batch.append(t if t.shape[-2:] == (h, w) else F.interpolate(t, size=(h, w), mode="bilinear"))
    x = torch.cat(batch).to(device)
    return module.to(device)(x).float().cpu()
