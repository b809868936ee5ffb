"""The training stream continues from a checkpoint's position exactly: batch N onwards, for any N, with a
mix of sources, pairs, a shuffle buffer and several loader workers (``FaceDataModule.load_state_dict``)."""

from __future__ import annotations

import itertools
import logging

import pytest

from blendexp.data.datamodule import FaceDataModule
from tests.data.conftest import face_sample, members_of, write_tar
from tests.data.test_pairs import clip_frames


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Two sources: 3 shards of video frames (2 clips each) and 2 shards of stills."""
    out = tmp_path_factory.mktemp("replay")
    videos = [str(write_tar(out / f"v{i}.tar", [m for c in ("c0", "c1") for s in clip_frames(f"p{i}", c, 6)
                                                for m in members_of(s)])) for i in range(3)]
    stills = [str(write_tar(out / f"s{i}.tar", [m for j in range(5) for m in
                                                members_of(face_sample("s", f"q{i}", None, j))])) for i in range(2)]
    return {"videos": videos, "stills": stills}


def datamodule(shards: dict[str, list[str]], num_workers: int, **kw) -> FaceDataModule:
    """Both sources mixed, frames paired within a clip, stills within a subject, shuffled through a small buffer."""
    return FaceDataModule({name: {"shards": urls, "weight": 1.0} for name, urls in shards.items()}, image_size=16,
                          batch_size=3, num_workers=num_workers, shuffle_buffer=5, seed=3,
                          pairs={"min_gap": 2, "max_gap": 6, "stills": True}, **kw)


def keys(dm: FaceDataModule, n: int) -> list[list[tuple[str, str]]]:
    """(target, reference) keys of the first ``n`` training batches."""
    return [list(zip(b["key"], b["ref_key"])) for b in itertools.islice(iter(dm.train_dataloader()), n)]


@pytest.mark.parametrize(("num_workers", "done"), [(0, 5), (2, 5), (2, 6)])
def test_stream_continues_at_the_checkpoint_position(shards: dict[str, list[str]], num_workers: int,
                                                     done: int) -> None:
    fresh = keys(datamodule(shards, num_workers), done + 4)
    resumed = datamodule(shards, num_workers)
    resumed.load_state_dict({"epoch": 0, "batches": done, "stream": resumed.stream_settings()})
    assert keys(resumed, 4) == fresh[done:]
    assert len({k for batch in fresh for k in batch}) > 12  # a real stream, not one batch repeated


def test_changed_stream_settings_start_afresh_with_a_warning(shards: dict[str, list[str]],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    saved = datamodule(shards, 0).stream_settings()
    dm = datamodule(shards, 0, use_latents=False)
    with caplog.at_level(logging.WARNING):
        dm.load_state_dict({"epoch": 0, "batches": 5, "stream": saved})
    assert "data settings use_latents differ from the checkpoint's" in caplog.text
    assert keys(dm, 2) == keys(datamodule(shards, 0), 2)
