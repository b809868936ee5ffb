"""Image and video helpers every layer shares (sample grids, reports, the toy world, the generation commands):
tiling, tensor-to-uint8 conversion, reading image files and writing/reading MP4s. No Lightning, no models."""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import av
import numpy as np
from PIL import Image

if TYPE_CHECKING:  # to_uint8 only calls tensor methods: importing this module does not load torch
    import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_grid(rows: list[list[np.ndarray | None]], pad: int = 2) -> Image.Image:
    """Tile uint8 (H, W, 3) images into one picture; ``None`` cells stay white."""
    h, w = next(c for r in rows for c in r if c is not None).shape[:2]
    grid = np.full((len(rows) * (h + pad) + pad, max(map(len, rows)) * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                y, x = pad + i * (h + pad), pad + j * (w + pad)
                grid[y:y + h, x:x + w] = cell[:h, :w]
    return Image.fromarray(grid)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] → (N, H, W, 3) uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def load_image(path: str | Path, what: str = "image") -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; a missing, unreadable or undecodable file is one error naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (IsADirectoryError, PermissionError) as err:
        raise ValueError(f"{what} {path} cannot be read ({err.strerror.lower()}); give a JPEG or PNG photo") from None
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError, truncated or malformed files
        raise ValueError(f"{what} {path} does not decode as an image ({type(err).__name__}); give a JPEG or PNG "
                         f"photo") from None


@lru_cache(maxsize=1)
def video_codec() -> str:
    """H.264 when the bundled FFmpeg has libx264, else MPEG-4 part 2 (both decode everywhere)."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # noqa: BLE001 - PyAV raises different errors per version for a missing encoder
        return "mpeg4"


def write_video(
    path: str | Path, frames: np.ndarray | list[Image.Image], fps: float, codec: str | None = None
) -> Path:
    """Encode (T, H, W, 3) uint8 RGB frames as an MP4 (yuv420p, high quality) and return its path."""
    arr = np.stack([np.asarray(f, dtype=np.uint8) for f in frames])
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] % 2 or arr.shape[2] % 2:
        raise ValueError(f"{path}: frames must be (T, H, W, 3) with even H and W, got {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or video_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = arr.shape[2], arr.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "16", "preset": "fast"}
        else:
            stream.bit_rate = max(1_000_000, int(16 * arr.shape[1] * arr.shape[2] * fps))
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file to (T, H, W, 3) uint8 RGB."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames)
