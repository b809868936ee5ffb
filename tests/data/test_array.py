"""Shard builds as array jobs: N parts (SLURM array tasks or one process) merge into the bytes of one build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blendexp.data import annotate
from blendexp.data.build import build
from tests.conftest import REPO
from tests.data.conftest import SMALL_SHARDS, build_config, shard_bytes

# 2 clips of 12 frames: part 0 builds clip 1, part 1 clip 2, each in 6 shards of 2, so the parts' shard boundaries
# fall where one build's do and the merge must reproduce the reference build byte for byte.
ARRAY = ("array.size=2",)


def reports(out: Path) -> tuple[dict, str]:
    """manifest.json without its absolute paths, and rejects.jsonl."""
    manifest = json.loads((out / "manifest.json").read_text().replace(str(out), "<out>"))
    return manifest, (out / "rejects.jsonl").read_text()


def test_one_process_array_build_equals_one_build(tmp_path: Path, toy_videos: Path, annotators: Path,
                                                 reference: dict[str, bytes], reference_build: Path) -> None:
    torch.set_num_threads(2)  # the reference ran on one: an in-process build uses threads_per_worker all the same
    try:
        result = build(build_config(tmp_path, {"clips": toy_videos}, annotators, *SMALL_SHARDS, *ARRAY))
    finally:
        torch.set_num_threads(1)
    assert shard_bytes(tmp_path) == reference
    assert reports(tmp_path) == reports(reference_build)  # same manifest (shards, subjects, clips) and rejects
    assert result["array"] == {"merged": [0, 1], "size": 2}
    parts = sorted(p.name for p in (tmp_path / ".build").glob("part-*"))
    assert parts == ["part-0000-of-0002", "part-0001-of-0002"]
    assert not list((tmp_path / ".build").rglob("*.tar"))  # moved into out, not copied


def test_missing_part_is_reported_then_merged_when_built(tmp_path: Path, toy_videos: Path, annotators: Path,
                                                        reference: dict[str, bytes],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def cfg(*overrides: str):
        return build_config(tmp_path, {"clips": toy_videos}, annotators, *SMALL_SHARDS, *ARRAY, *overrides)

    real = annotate.annotate

    def broken(c, tasks):  # the first part's worker dies on its first task
        raise RuntimeError("node lost")

    monkeypatch.setattr(annotate, "annotate", broken)
    with pytest.raises(RuntimeError, match="node lost"):
        build(cfg("array.index=0"))
    monkeypatch.setattr(annotate, "annotate", real)
    part1 = build(cfg("array.index=1"))
    assert part1["array"] == {"part": 1, "size": 2} and part1["stats"]["sources"]["clips"]["samples"] == 12
    with pytest.raises(ValueError, match=r"1 of 2 parts are incomplete: part 0 .*failed: RuntimeError: node lost; "
                                         r"0 of 1 tasks packed.*array.allow_partial=true"):
        build(cfg("array.index=merge"))
    assert not shard_bytes(tmp_path)  # nothing moved by a refused merge
    partial = build(cfg("array.index=merge", "array.allow_partial=true"))["manifest"]
    assert partial["partial"]["missing"] == {"0": "failed: RuntimeError: node lost; 0 of 1 tasks packed"}
    assert partial["sources"]["clips"]["samples"] == 12 and partial["sources"]["clips"]["clips"] == {"s5/c00": 12}
    assert not shard_bytes(tmp_path)  # a partial merge moves nothing: the later full merge numbers every shard

    # A part killed after its second shard: the re-run redoes only what is missing.
    build(cfg("array.index=0"))
    work = tmp_path / ".build" / "part-0000-of-0002"
    kept = (work / "clips-000000.tar").stat().st_mtime_ns
    for name in (".build/clips.complete", *(f".build/clips-{i:06d}.done" for i in range(2, 6))):
        (work / name).unlink()
    build(cfg("array.index=0"))
    assert (work / "clips-000000.tar").stat().st_mtime_ns == kept
    assert not (work / "failed.json").exists()

    merged = build(cfg("array.index=merge"))
    assert "partial" not in merged["manifest"] and shard_bytes(tmp_path) == reference
    build(cfg("array.index=merge"))  # again, and a part again: nothing changes
    build(cfg("array.index=1"))
    assert shard_bytes(tmp_path) == reference


def test_bad_array_settings_are_refused(tmp_path: Path, toy_videos: Path, annotators: Path) -> None:
    for overrides, message in ((("array.index=2",), r"array.index must be 0..1"),
                               (("array.size=0",), r"array.size must be a whole number >= 1"),
                               (("shard_url='pipe:cat > /x/{source}-{index:06d}.tar'",), r"put \{part\} in shard_url")):
        with pytest.raises(ValueError, match=message):
            build(build_config(tmp_path, {"clips": toy_videos}, annotators, *ARRAY, *overrides))


@pytest.mark.slow  # two SLURM array tasks and the merge, as CLI processes: ~1 min, mostly imports
def test_slurm_array_tasks_and_merge_write_the_reference_bytes(slurm: str, tmp_path: Path, toy_videos: Path,
                                                               annotators: Path, reference: dict[str, bytes]) -> None:
    args = [f"out={tmp_path}/shards", f"+sources.clips.inputs={toy_videos}", "num_workers=0", "face.detector=mtcnn",
            f"tiny_annotators={annotators}", "identity.path=null", "expression.smirk=null", "face.size=64",
            "face.min_size=24", f"paths.outputs={tmp_path}/logs", *SMALL_SHARDS, *ARRAY]
    env = {"PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}

    def cli(*more: str, multirun: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "blendexp.data.build", *multirun, *args, *more], cwd=REPO, text=True,
                              capture_output=True, timeout=900, env={**os.environ, **env})

    sweep = tmp_path / "sweep"
    res = cli("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
              f"hydra.sweep.dir={sweep}", "array.index=0,1", multirun=("-m",))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    logs = sorted((sweep / ".submitit").glob("*_*/*_log.out"))
    array_job = {p.parent.name.split("_")[0] for p in logs}
    assert len(logs) == 2 and len(array_job) == 1, logs  # one SLURM array job, two tasks
    assert all("part" in p.read_text() and "array.index=merge" in p.read_text() for p in logs)
    res = cli("array.index=merge")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "clips: 24 samples from 2 inputs in 12 shards" in res.stdout
    assert shard_bytes(tmp_path / "shards") == reference
