"""Toy talking-head clips and still sets with per-frame ground truth, written as real MP4 files.

Video builders, pair samplers (reference frame -> target frame) and annotator evaluations need
clips whose expression changes smoothly and whose truth is known; ``write_clip`` stores the
frames as ``<name>.mp4`` and the truth as ``<name>.npz`` next to it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from blendexp.flame import EXP_DIM, EYELIDS
from blendexp.images import read_video, write_video
from blendexp.toyworld.params import (Identity, Nuisance, identity_rng, sample_expression, sample_identity,
                                      sample_nuisance)
from blendexp.toyworld.render import render_face

log = logging.getLogger(__name__)
INPUT_MTIME = 946684800  # 2000-01-01: fixed file times, so a re-render keeps the resume fingerprint of a build


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


def render_builder_inputs(out: str, seed: int, size: int, nuisance: float, stills: Mapping[str, Any],
                          videos: Mapping[str, Any], val: Mapping[str, Any]) -> Path:
    """Render toy-world stills (PNG) and clips (MP4 + ground-truth .npz) as inputs of ``python -m blendexp.data.build
    data/build=toy`` (its ``toy._target_``); skipped when ``out`` already holds this very set."""
    parts = {"stills": stills, "videos": videos, "val": val}
    spec = json.dumps({"out": out, "seed": seed, "size": size, "nuisance": nuisance, **parts}, sort_keys=True)
    root, marker = Path(out), Path(out) / ".complete"
    if marker.exists() and marker.read_text() == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)
    subject = 0
    for split, part in parts.items():
        for _ in range(int(part["subjects"])):
            rng = identity_rng(int(seed), "builder_inputs", subject)
            identity, folder = sample_identity(rng), root / split / f"s{subject:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "videos":
                for c in range(int(part["clips"])):
                    clip = make_clip(identity, rng, int(part["frames"]), int(size), float(part["fps"]),
                                     nuisance_strength=float(nuisance))
                    write_clip(clip, folder, f"c{c:02d}")
            else:
                for i, (image, _) in enumerate(render_stills(identity, rng, int(part["per_subject"]), int(size),
                                                             nuisance_strength=float(nuisance))):
                    image.save(folder / f"{i:03d}.png")
            subject += 1
    for path in root.rglob("*"):
        os.utime(path, (INPUT_MTIME, INPUT_MTIME))
    marker.write_text(spec)
    log.info("toy-world inputs rendered to %s", root)
    return root
