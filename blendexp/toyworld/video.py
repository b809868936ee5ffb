"""Toy talking-head clips and still sets with per-frame ground truth, written as real MP4 files.

Video builders, pair samplers (reference frame -> target frame) and annotator evaluations need
clips whose expression changes smoothly and whose truth is known; ``write_clip`` stores the
frames as ``<name>.mp4`` and the truth as ``<name>.npz`` next to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image

from blendexp.data.format import EXP_DIM, EYELIDS
from blendexp.toyworld.params import Identity, Nuisance, sample_expression, sample_nuisance
from blendexp.toyworld.render import render_face


@dataclass
class Clip:
    """A rendered clip and its per-frame ground truth (what annotators and models are measured against)."""

    identity: Identity
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    expressions: np.ndarray  # (T, 55) float32 FLAME
    nuisances: list[Nuisance]  # T entries
    fps: float


def _ease(t: np.ndarray) -> np.ndarray:
    """Cosine ease-in/out: zero velocity at keyframes, so motion has no jerks where segments meet."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t, 0.0, 1.0))


def expression_track(rng: np.random.Generator, n_frames: int, fps: float, scale: float = 1.0) -> np.ndarray:
    """(T, 55) smooth expression path: eased moves between random keyframes every 0.3-0.9 s, plus quick blinks."""
    lo, hi = max(2, round(0.3 * fps)), max(3, round(0.9 * fps))
    keys = [0]
    while keys[-1] < n_frames - 1:
        keys.append(keys[-1] + int(rng.integers(lo, hi + 1)))
    values = np.stack([sample_expression(rng, scale) for _ in keys])  # (K, 55)
    t = np.arange(n_frames)
    seg = np.clip(np.searchsorted(keys, t, side="right") - 1, 0, len(keys) - 2)
    start, end = np.asarray(keys)[seg], np.asarray(keys)[seg + 1]
    w = _ease((t - start) / (end - start))[:, None]
    track = values[seg] * (1 - w) + values[seg + 1] * w
    half = max(1.5, 0.1 * fps)  # a blink lasts ~0.2 s
    for centre in rng.uniform(0, n_frames, rng.poisson(0.3 * n_frames / fps)):
        x = (t - centre) / half
        pulse = np.where(np.abs(x) < 1, np.cos(x * np.pi / 2) ** 2, 0.0)
        track[:, EYELIDS] = np.maximum(track[:, EYELIDS], pulse[:, None])
    return track.astype(np.float32)


def _drift(nz: Nuisance, rng: np.random.Generator, amount: float) -> Nuisance:
    """The same shot a few seconds later: pose, light and framing moved a little, background unchanged."""
    u = rng.uniform
    return replace(nz, yaw=nz.yaw + u(-0.08, 0.08) * amount, pitch=nz.pitch + u(-0.05, 0.05) * amount,
                   roll=nz.roll + u(-0.04, 0.04) * amount, light_azimuth=nz.light_azimuth + u(-0.5, 0.5) * amount,
                   light_strength=max(0.0, nz.light_strength + u(-0.05, 0.05) * amount),
                   brightness=nz.brightness + u(-0.05, 0.05) * amount, scale=nz.scale + u(-0.02, 0.02) * amount,
                   dx=nz.dx + u(-0.01, 0.01) * amount, dy=nz.dy + u(-0.01, 0.01) * amount)  # fmt: skip


def make_clip(identity: Identity, rng: np.random.Generator, n_frames: int, size: int, fps: float = 25.0,
              expression_scale: float = 1.0, nuisance_strength: float = 1.0) -> Clip:  # fmt: skip
    """Render one clip of ``identity``: smooth expression changes with slow pose and lighting drift."""
    if n_frames < 2:
        raise ValueError(f"n_frames={n_frames}; a clip needs at least 2 frames")
    expressions = expression_track(rng, n_frames, fps, expression_scale)
    first = sample_nuisance(rng, nuisance_strength)
    a, b = first.to_vector(), _drift(first, rng, nuisance_strength).to_vector()
    w = _ease(np.linspace(0.0, 1.0, n_frames))
    nuisances = [Nuisance.from_vector(a + (b - a) * wi) for wi in w]
    frames = np.stack([np.asarray(render_face(identity, e, n, size)) for e, n in zip(expressions, nuisances)])
    return Clip(identity, frames, expressions, nuisances, float(fps))


def render_stills(identity: Identity, rng: np.random.Generator, n: int, size: int, expression_scale: float = 1.0,
                  nuisance_strength: float = 1.0) -> list[tuple[Image.Image, np.ndarray]]:  # fmt: skip
    """``n`` independent photos of ``identity`` as (image, (55,) expression) pairs, for still-image sets."""
    out = []
    for _ in range(n):
        exp = sample_expression(rng, expression_scale)
        out.append((render_face(identity, exp, sample_nuisance(rng, nuisance_strength), size), exp))
    return out


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


def write_clip(clip: Clip, out_dir: str | Path, name: str) -> Path:
    """Write ``<name>.mp4`` plus ``<name>.npz`` (identity, expressions, nuisances, fps); return the MP4 path."""
    video = write_video(Path(out_dir) / f"{name}.mp4", clip.frames, clip.fps)
    np.savez(video.with_suffix(".npz"), identity=clip.identity.to_vector(), expressions=clip.expressions,
             nuisances=np.stack([n.to_vector() for n in clip.nuisances]), fps=np.float32(clip.fps))  # fmt: skip
    return video


def read_clip(video_path: str | Path) -> Clip:
    """Load a clip written by ``write_clip``: decoded frames plus the ground truth stored beside them."""
    video_path = Path(video_path)
    truth_path = video_path.with_suffix(".npz")
    if not truth_path.exists():
        raise FileNotFoundError(f"{truth_path} is missing; clips are written as <name>.mp4 + <name>.npz")
    with np.load(truth_path, allow_pickle=False) as truth:
        expressions = truth["expressions"].astype(np.float32)
        if expressions.ndim != 2 or expressions.shape[1] != EXP_DIM:
            raise ValueError(f"{truth_path}: expressions have shape {expressions.shape}, expected (T, {EXP_DIM})")
        identity = Identity.from_vector(truth["identity"])
        nuisances = [Nuisance.from_vector(v) for v in truth["nuisances"]]
        fps = float(truth["fps"])
    frames = read_video(video_path)
    if len(frames) != len(expressions):
        raise ValueError(f"{video_path}: {len(frames)} frames decoded but {len(expressions)} expressions stored")
    return Clip(identity, frames, expressions, nuisances, fps)
