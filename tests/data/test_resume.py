"""Builds are deterministic and resumable: a killed or half-written build completes to byte-identical shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blendexp.data import annotate
from blendexp.data.build import build
from tests.conftest import REPO
from tests.data.conftest import SMALL_SHARDS, build_config, shard_bytes


def test_two_workers_write_the_same_bytes(tmp_path: Path, toy_videos: Path, annotators: Path,
                                          reference: dict[str, bytes]) -> None:
    build(build_config(tmp_path, {"clips": toy_videos}, annotators, *SMALL_SHARDS, "num_workers=2"))
    assert shard_bytes(tmp_path) == reference


# The user's build command, killed with its worker right after its third shard's done marker (mid-way through the
# first clip): a fault at a fixed point, not a race against a build that may finish first on a fast machine.
KILLED_BUILD = """
import os, runpy, signal, sys
from blendexp.data import packing
close = packing.ShardPacker._close
def close_then_die(self, next_start):
    close(self, next_start)
    if len(self.markers) == 3:
        os.killpg(0, signal.SIGKILL)
packing.ShardPacker._close = close_then_die
runpy.run_module("blendexp.data.build", run_name="__main__")
"""


@pytest.mark.slow  # a real CLI subprocess: ~20 s, mostly imports
def test_killed_build_resumes_to_identical_shards(tmp_path: Path, toy_videos: Path, annotators: Path,
                                                  reference: dict[str, bytes]) -> None:
    cfg = build_config(tmp_path, {"clips": toy_videos}, annotators, *SMALL_SHARDS, "num_workers=1")
    args = [f"out={tmp_path}", f"+sources.clips.inputs={toy_videos}", "num_workers=1", "face.detector=mtcnn",
            f"tiny_annotators={annotators}", "identity.path=null", "expression.smirk=null", "face.size=64",
            "face.min_size=24", f"paths.outputs={tmp_path}/logs", *SMALL_SHARDS]
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, *args], cwd=REPO, start_new_session=True,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    work = tmp_path / ".build"
    assert sorted(p.name for p in work.glob("*.done")) == [f"clips-{i:06d}.done" for i in range(3)]
    assert not (work / "clips.complete").exists()
    build(cfg)
    assert shard_bytes(tmp_path) == reference
    assert not list(tmp_path.glob("*.tmp"))


def test_partial_temp_shard_and_lost_marker_are_redone(tmp_path: Path, toy_videos: Path, annotators: Path,
                                                       reference: dict[str, bytes]) -> None:
    cfg = build_config(tmp_path, {"clips": toy_videos}, annotators, *SMALL_SHARDS)
    build(cfg)
    work = tmp_path / ".build"
    # Pretend the build died while writing shard 7: no marker for 6 or 7, half of 7 on disk, journal cut mid-line.
    for name in ("clips.complete", *(f"clips-{i:06d}.done" for i in range(6, 12))):
        (work / name).unlink()
    for i in range(7, 12):
        (tmp_path / f"clips-{i:06d}.tar").unlink()
    (tmp_path / "clips-000007.tar.tmp").write_bytes(reference["clips-000007.tar"][:3000])
    journal = work / "clips.journal.jsonl"
    journal.write_text(journal.read_text()[:-40])
    before = (tmp_path / "clips-000002.tar").stat().st_mtime_ns
    build(cfg)
    assert shard_bytes(tmp_path) == reference
    assert (tmp_path / "clips-000002.tar").stat().st_mtime_ns == before, "finished shards are not rewritten"
    assert json_samples(tmp_path) == 24


def json_samples(out: Path) -> int:
    """Sample count recorded in the manifest."""
    return json.loads((out / "manifest.json").read_text())["sources"]["clips"]["samples"]


def test_rerun_with_other_settings_needs_overwrite(tmp_path: Path, toy_videos: Path, annotators: Path) -> None:
    build(build_config(tmp_path, {"clips": toy_videos}, annotators, "video.max_frames=2"))
    with pytest.raises(ValueError, match=f"{tmp_path} holds a build made from other inputs or settings"):
        build(build_config(tmp_path, {"clips": toy_videos}, annotators, "video.max_frames=3"))
    build(build_config(tmp_path, {"clips": toy_videos}, annotators, "video.max_frames=3", "overwrite=true"))
    assert json_samples(tmp_path) == 6


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path: Path, toy_videos: Path, annotators: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(annotate, "fork_safe", lambda: True)  # forked workers inherit the patch below
    monkeypatch.setattr(annotate.Annotator, "run", lambda self, task: os._exit(9))  # as if killed mid-task
    with pytest.raises(RuntimeError, match="a build worker process died .*run the same command again to resume"):
        build(build_config(tmp_path, {"clips": toy_videos}, annotators, *SMALL_SHARDS, "num_workers=2"))
