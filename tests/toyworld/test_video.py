"""Toy-world clips: smooth ground truth, real MP4 files that decode back, stills."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blendexp.flame import EXP_DIM, EYELIDS
from blendexp.images import read_video, video_codec, write_video
from blendexp.toyworld.render import sample_identity
from blendexp.toyworld.video import Clip, expression_track, make_clip, read_clip, render_stills, write_clip


@pytest.fixture(scope="module")
def clip() -> Clip:
    """A 40-frame 64 px clip, rendered once for the module."""
    rng = np.random.default_rng(0)
    return make_clip(sample_identity(rng), rng, n_frames=40, size=64, fps=25)


def test_clip_holds_frames_and_per_frame_truth(clip: Clip) -> None:
    assert clip.frames.shape == (40, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.expressions.shape == (40, EXP_DIM) and clip.expressions.dtype == np.float32
    assert len(clip.nuisances) == 40
    assert np.ptp(clip.expressions, axis=0).max() > 0.5  # the expression actually moves
    assert len({round(n.yaw, 6) for n in clip.nuisances}) > 1  # and the pose drifts


def test_same_seed_gives_the_same_clip(clip: Clip) -> None:
    rng = np.random.default_rng(0)
    again = make_clip(sample_identity(rng), rng, n_frames=40, size=64, fps=25)
    assert again.frames.tobytes() == clip.frames.tobytes()
    assert np.array_equal(again.expressions, clip.expressions)


def test_written_clip_decodes_with_its_truth(clip: Clip, tmp_path: Path) -> None:
    path = write_clip(clip, tmp_path / "clips", "subject0_clip0")
    assert path.suffix == ".mp4" and path.with_suffix(".npz").exists()
    back = read_clip(path)
    assert back.frames.shape == (40, 64, 64, 3)
    assert np.array_equal(back.expressions, clip.expressions)
    assert back.identity == clip.identity and back.fps == 25.0
    assert np.allclose([n.yaw for n in back.nuisances], [n.yaw for n in clip.nuisances])
    assert np.abs(back.frames.astype(int) - clip.frames).mean() < 4  # lossy but faithful encoding


def test_consecutive_frames_are_closer_than_random_frames(clip: Clip, tmp_path: Path) -> None:
    frames = read_video(write_video(tmp_path / "v.mp4", clip.frames, clip.fps)).astype(np.float32)
    consecutive = np.abs(np.diff(frames, axis=0)).mean()
    rng = np.random.default_rng(1)
    i, j = rng.integers(0, len(frames), (2, 200))
    far = np.abs(i - j) > 5
    random_pairs = np.abs(frames[i[far]] - frames[j[far]]).mean()
    assert consecutive < 0.5 * random_pairs


def test_expression_track_is_smooth_apart_from_blinks() -> None:
    track = expression_track(np.random.default_rng(3), n_frames=200, fps=25)
    no_lids = np.delete(track, np.r_[EYELIDS], axis=1)
    step = np.abs(np.diff(no_lids, axis=0)).max()
    spread = np.ptp(no_lids, axis=0).max()
    assert step < 0.25 * spread  # eased keyframes 0.3-0.9 s apart: no frame jumps far
    assert track[:, EYELIDS].max() > 0.9  # blinks close the eyes at some point in 8 s


@pytest.mark.parametrize("codec", sorted({video_codec(), "mpeg4"}))
def test_each_available_codec_round_trips(codec: str, clip: Clip, tmp_path: Path) -> None:
    frames = read_video(write_video(tmp_path / f"{codec}.mp4", list(clip.frames[:10]), 25, codec=codec))
    assert frames.shape == (10, 64, 64, 3)
    assert np.abs(frames.astype(int) - clip.frames[:10]).mean() < 6


def test_odd_frame_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even H and W"):
        write_video(tmp_path / "odd.mp4", np.zeros((3, 63, 64, 3), np.uint8), 25)


def test_read_clip_needs_its_truth_file(clip: Clip, tmp_path: Path) -> None:
    path = write_clip(clip, tmp_path, "c")
    path.with_suffix(".npz").unlink()
    with pytest.raises(FileNotFoundError, match="c.npz"):
        read_clip(path)


def test_render_stills_pairs_images_with_their_expressions() -> None:
    rng = np.random.default_rng(2)
    stills = render_stills(sample_identity(rng), rng, n=5, size=64)
    assert len(stills) == 5
    assert all(img.size == (64, 64) and exp.shape == (EXP_DIM,) for img, exp in stills)
    assert len({exp.tobytes() for _, exp in stills}) == 5
