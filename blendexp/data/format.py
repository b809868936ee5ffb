"""The shard contract: the single place that says what one training sample looks like on disk.

One sample per aligned face crop, keyed ``<source>/<subject>/<clip-or-image>/<frame>``:
``jpg`` (aligned RGB face), ``id.npy`` (512,) float32 L2-normalised identity embedding,
``exp.npy`` (55,) float32 FLAME vector (50 expression, 2 eyelid, 3 jaw, as SMIRK outputs),
``json`` metadata and optionally ``latents.npy`` (cached VAE latents, (C, H/8, W/8); C = 4 for SD 1.5).
Builder, loader, evaluator and toy world all read and write through this module; the vectors' layout is
``blendexp/flame.py``'s.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from blendexp.flame import EXP_DIM, ID_DIM, check_vector

FORMAT_VERSION = 1
REQUIRED_KEYS = ("jpg", "id.npy", "exp.npy", "json")
NORM_TOLERANCE = 1e-3  # | ||id|| - 1 | allowed on read: float32 storage keeps real embeddings within 1e-6
# Why a member is unusable: a tar that cannot be read on, a member that is absent or does not decode, an array or
# image of the wrong shape, NaN/Inf values, an identity embedding that is not unit norm.
SKIP_REASONS = ("unreadable", "missing", "decode", "shape", "non-finite", "norm")


class CorruptSample(ValueError):
    """A shard member that cannot be used; the loader skips and counts it (by ``reason``) instead of crashing."""

    def __init__(self, message: str, reason: str = "decode") -> None:
        """``reason``: one of ``SKIP_REASONS``."""
        super().__init__(message)
        self.reason = reason


def make_key(source: str, subject: str, clip: str | None, frame: int) -> str:
    """Sample key; stills use their image name in the clip slot and frame 0."""
    for part in (source, subject, clip or "still"):
        if "/" in part or "." in part:
            raise ValueError(f"key part {part!r} must not contain '/' or '.'")
    return f"{source}/{subject}/{clip or 'still'}/{frame:06d}"


@dataclass
class FaceSample:
    """One aligned face with its identity and expression vectors (the unit every stage exchanges)."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8 RGB, aligned
    id_emb: np.ndarray  # (512,) float32, L2-normalised
    exp: np.ndarray  # (55,) float32 FLAME
    meta: dict[str, Any] = field(default_factory=dict)
    latents: np.ndarray | None = None  # (C, H/8, W/8) float32 (C: the VAE's latent channels, 4 in SD 1.5), already scaled by the VAE factor

    @property
    def clip(self) -> str | None:
        """Clip id for video frames, ``None`` for stills."""
        return self.meta.get("clip")

    @property
    def subject(self) -> str:
        """Subject (identity) label used for pairing and splits."""
        return str(self.meta.get("subject", self.key.split("/")[1]))


def vae_latents(vae: Any, images: np.ndarray) -> np.ndarray:
    """``latents.npy`` of (N, H, W, 3) uint8 faces: the scaled posterior means of ``vae`` (an AutoencoderKL), so
    training reads them instead of encoding pixels at every step (deterministic, unlike a posterior sample)."""
    import torch  # here: the contract's readers do not need torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().to(vae.device) / 127.5 - 1.0
    with torch.no_grad():
        return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).cpu().numpy()


def _npy_bytes(arr: np.ndarray) -> bytes:
    """Serialise an array the way webdataset's ``.npy`` decoder reads it."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_sample(sample: FaceSample, jpeg_quality: int = 95) -> dict[str, Any]:
    """Turn a sample into the member dict that ``webdataset.TarWriter`` writes."""
    img = Image.fromarray(np.asarray(sample.image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=jpeg_quality)
    id_emb = check_vector(sample.id_emb, ID_DIM, "identity embedding", sample.key)
    meta = {"format_version": FORMAT_VERSION, **sample.meta}
    out = {
        "__key__": sample.key,
        "jpg": buf.getvalue(),
        "id.npy": _npy_bytes(id_emb / max(float(np.linalg.norm(id_emb)), 1e-12)),
        "exp.npy": _npy_bytes(check_vector(sample.exp, EXP_DIM, "FLAME vector", sample.key)),
        "json": json.dumps(meta, sort_keys=True).encode(),
    }
    if sample.latents is not None:
        out["latents.npy"] = _npy_bytes(np.asarray(sample.latents, dtype=np.float32))
    return out


def _load_npy(data: bytes, name: str, key: str) -> np.ndarray:
    """Read an ``.npy`` member without unpickling, turning any failure into ``CorruptSample``."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any decode failure means a corrupt member
        raise CorruptSample(f"{key}: cannot read {name}: {err}") from err


def _contract_vector(data: bytes, name: str, dim: int, key: str) -> np.ndarray:
    """An ``.npy`` member of exactly shape (dim,) with finite values, as float32."""
    arr = _load_npy(data, name, key)
    if arr.shape != (dim,):
        raise CorruptSample(f"{key}: {name} has shape {arr.shape}; the shard contract needs ({dim},)", "shape")
    if not np.issubdtype(arr.dtype, np.number):
        raise CorruptSample(f"{key}: {name} holds {arr.dtype}, not numbers", "decode")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise CorruptSample(f"{key}: {name} contains NaN or Inf", "non-finite")
    return arr


def _contract_image(data: bytes, declared: Any, key: str) -> Image.Image:
    """The ``jpg`` member decoded: 3 channels (RGB) and, when the metadata declares ``size``, that square size."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # noqa: BLE001 - truncated or undecodable JPEG
        raise CorruptSample(f"{key}: undecodable jpg: {err}") from err
    if img.mode != "RGB":
        raise CorruptSample(f"{key}: jpg decodes to mode {img.mode}; the shard contract needs 3 channels (RGB)", "shape")
    if declared is not None and img.size != (declared, declared):
        raise CorruptSample(f"{key}: jpg is {img.size[0]}x{img.size[1]} but its json declares size {declared}",
                            "shape")
    return img


def decode_sample(raw: dict[str, Any], image_size: int | None = None) -> FaceSample:
    """Validate raw tar members (bytes) against the contract and decode them into a ``FaceSample`` (resized to
    ``image_size`` when given); raise ``CorruptSample`` with its reason if the sample is unusable."""
    key = str(raw.get("__key__", "?"))
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise CorruptSample(f"{key}: missing members {missing}", "missing")
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptSample(f"{key}: undecodable json: {err}") from err
    if not isinstance(meta, dict):
        raise CorruptSample(f"{key}: json is {type(meta).__name__}, expected an object")
    img = _contract_image(raw["jpg"], meta.get("size"), key)
    if image_size and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    id_emb = _contract_vector(raw["id.npy"], "id.npy", ID_DIM, key)
    norm = float(np.linalg.norm(id_emb))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        raise CorruptSample(f"{key}: id.npy has norm {norm:.4g}; the shard contract needs unit norm "
                            f"(within {NORM_TOLERANCE})", "norm")
    exp = _contract_vector(raw["exp.npy"], "exp.npy", EXP_DIM, key)
    latents = _load_npy(raw["latents.npy"], "latents.npy", key).astype(np.float32) if "latents.npy" in raw else None
    return FaceSample(key=key, image=np.array(img, dtype=np.uint8), id_emb=id_emb, exp=exp, meta=meta,
                      latents=latents)
