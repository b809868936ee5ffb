"""Shard builds as array jobs: ``array.size=N array.index=i`` builds part i of N, ``array.index=merge`` joins them.

The plan (inputs cut into tasks, inputs.py) is split per source into N contiguous runs of tasks of about equal work.
Part i is an ordinary build of its runs into ``<work_dir>/part-<i>-of-<N>`` (its own shards, done markers and
journal, so a killed part resumes where it stopped). The merge moves the parts' local shards into ``out`` under
consecutive indices in task order, points the parts' done markers at their new places (re-running a part or the merge
then changes nothing) and writes manifest.json, rejects.jsonl and stats.json from the parts' journals, as one build
writes them. So N parts give the same bytes as ``array.size=N`` in one process (``array.index=null``: every part in
turn, then the merge); shards never span two parts, so each part's last shard may be short.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blendexp.data.packing import Packed, ShardPacker, is_remote, pack, plan_fingerprint, shard_url, write_reports
from blendexp.results import write_atomic

if TYPE_CHECKING:
    from blendexp.data.inputs import Task

log = logging.getLogger(__name__)
MERGE = "merge"


def check_index(array: Mapping[str, Any]) -> tuple[int, int | str | None]:
    """``array.size`` >= 1 and ``array.index`` one of 0..size-1, ``merge`` or null (builds and evaluations alike)."""
    size, index = array["size"], array["index"]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"array.size must be a whole number >= 1, not {size!r}")
    if index is not None and index != MERGE and not (isinstance(index, int) and 0 <= index < size):
        raise ValueError(f"array.index must be 0..{size - 1} (this process's part), 'merge' or null (every part in "
                         f"this process), not {index!r}")
    return size, index


@contextmanager
def recording_failure(folder: Path) -> Iterator[None]:
    """Run one part; its error goes to ``folder/failed.json`` for the merge to name (cleared when it runs again)."""
    failed = folder / "failed.json"
    failed.unlink(missing_ok=True)
    try:
        yield
    except Exception as err:
        write_atomic(failed, json.dumps({"error": f"{type(err).__name__}: {err}"}))
        raise


def failure(folder: Path) -> str | None:
    """``failed: <error>`` of a part that recorded one."""
    failed = folder / "failed.json"
    return f"failed: {json.loads(failed.read_text())['error']}" if failed.is_file() else None


def check_array(c: dict[str, Any]) -> None:
    """A valid ``array`` block; remote parts need ``{part}`` in ``shard_url``."""
    size, _ = check_index(c["array"])
    if size > 1 and c["shard_url"] and is_remote(c["shard_url"]) and "{part" not in c["shard_url"]:
        raise ValueError("with array.size > 1 each part writes its own remote shards: put {part} in shard_url, e.g. "
                         "'pipe:aws s3 cp - s3://bucket/{source}-{part:04d}-{index:06d}.tar'")


def task_weight(task: Task, max_frames: int | None) -> int:
    """About how much work a task is: one per image, ``video.max_frames`` (or 64) per video."""
    return sum((max_frames or 64) if item.video else 1 for item in task.items)


def split_plan(plan: dict[str, list[Task]], size: int, max_frames: int | None) -> list[dict[str, list[Task]]]:
    """Each source's tasks cut into ``size`` contiguous runs of about equal work, renumbered from 0 in each part."""
    from dataclasses import replace

    parts: list[dict[str, list[Task]]] = [{} for _ in range(size)]
    for source, tasks in plan.items():
        total, done = sum(task_weight(t, max_frames) for t in tasks), 0
        for task in tasks:
            part = min(size - 1, done * size // max(total, 1))
            done += task_weight(task, max_frames)
            run = parts[part].setdefault(source, [])
            run.append(replace(task, index=len(run)))
        for part in parts:
            part.setdefault(source, [])
    return parts


def part_config(c: dict[str, Any], index: int) -> dict[str, Any]:
    """The build settings of part ``index``: its own folder for local shards, markers, journal and reports."""
    size = c["array"]["size"]
    out = Path(c["work_dir"]) / f"part-{index:04d}-of-{size:04d}"
    remote = c["shard_url"] if c["shard_url"] and is_remote(c["shard_url"]) else None
    return {**c, "out": str(out), "work_dir": str(out / ".build"), "shard_url": remote, "part": index}


def build_part(c: dict[str, Any], plan: dict[str, list[Task]], index: int) -> dict[str, Any]:
    """Build one part; a failure is recorded in its folder (``failed.json``) for the merge to report."""
    pc = part_config(c, index)
    with recording_failure(Path(pc["out"])):
        result = pack(pc, split_plan(plan, c["array"]["size"], c["video"]["max_frames"])[index])
    return {**result, "array": {"part": index, "size": c["array"]["size"]}}


def build_array(c: dict[str, Any], plan: dict[str, list[Task]]) -> dict[str, Any]:
    """One part (``array.index=i``), the merge (``merge``), or every part in turn and then the merge (null)."""
    index = c["array"]["index"]
    if isinstance(index, int):
        return build_part(c, plan, index)
    if index is None:
        for part in range(c["array"]["size"]):
            build_part(c, plan, part)
    return merge(c, plan)


def part_state(pc: dict[str, Any], tasks: dict[str, list[Task]]) -> str | None:
    """None when every source of the part is packed, else what is missing (and the part's error, if it failed)."""
    work, packed = Path(pc["work_dir"]), 0
    if all((work / f"{source}.complete").exists() for source in tasks):
        return None
    for source in tasks:
        journal = work / f"{source}.journal.jsonl"
        packed += sum(line.endswith("}") for line in journal.read_text().splitlines()) if journal.exists() else 0
    total = sum(len(t) for t in tasks.values())
    return f"{failure(Path(pc['out'])) or 'not finished'}; {packed} of {total} tasks packed"


def check_fingerprint(pc: dict[str, Any], tasks: dict[str, list[Task]]) -> None:
    """Refuse to merge a part built from other inputs or settings than the ones configured now."""
    recorded = json.loads((Path(pc["work_dir"]) / "plan.json").read_text())["fingerprint"]
    if recorded != plan_fingerprint(pc, tasks)[0]:
        raise ValueError(f"part {pc['part']} in {pc['out']} was built from other inputs or settings than these; "
                         f"re-run it with array.index={pc['part']} overwrite=true")


def join_parts(c: dict[str, Any], source: str, packers: list[ShardPacker], move: bool) -> Packed:
    """The parts' reports and shards of ``source`` in order; ``move``: local shards moved into ``out`` under
    consecutive indices, their done markers rewritten to match."""
    reports: dict[int, dict[str, Any]] = {}
    markers: list[dict[str, Any]] = []
    for packer in packers:
        for task in sorted(packer.reports):
            reports[len(reports)] = packer.reports[task]
        for k, info in enumerate(packer.markers):
            dest = shard_url(c, source, len(markers), packer.cfg["part"])
            if move and not is_remote(info["url"]) and info["url"] != dest:
                Path(dest).parent.mkdir(parents=True, exist_ok=True)
                os.replace(info["url"], dest)
                info = {**info, "url": dest}
                write_atomic(packer.work / f"{source}-{k:06d}.done", json.dumps(info))
            markers.append(info)
    return Packed(reports, markers)


def merge(c: dict[str, Any], plan: dict[str, list[Task]]) -> dict[str, Any]:
    """Join finished parts into one build in ``out``; incomplete parts are reported, and refused unless
    ``array.allow_partial`` (then nothing is moved and the manifest lists the missing parts)."""
    size = c["array"]["size"]
    parts = split_plan(plan, size, c["video"]["max_frames"])
    configs = [part_config(c, i) for i in range(size)]
    missing = {i: state for i, pc in enumerate(configs) if (state := part_state(pc, parts[i]))}
    if missing and not c["array"]["allow_partial"]:
        lines = "; ".join(f"part {i} ({configs[i]['out']}): {state}" for i, state in missing.items())
        raise ValueError(f"{len(missing)} of {size} parts are incomplete: {lines}. Re-run them with array.index=<i> "
                         "(a killed part resumes), or merge what is there with array.allow_partial=true")
    done = [i for i in range(size) if i not in missing]
    for i in done:
        check_fingerprint(configs[i], parts[i])
    packers = {i: [ShardPacker(configs[i], s, len(parts[i][s])) for s in plan] for i in done}
    for i in done:
        if not all(p.complete for p in packers[i]):
            raise ValueError(f"part {i} ({configs[i]['out']}): a finished shard is missing (moved or deleted); "
                             f"re-run it with array.index={i} to rebuild from there")
    if missing:
        log.warning("merging %d of %d parts; missing: %s", len(done), size, missing)
    joined = {s: join_parts(c, s, [packers[i][k] for i in done], move=not missing) for k, s in enumerate(plan)}
    elapsed = sum(json.loads((Path(configs[i]["out"]) / "stats.json").read_text())["elapsed_s"] for i in done)
    partial = {"parts": size, "missing": {str(i): state for i, state in missing.items()}} if missing else None
    return {**write_reports(c, joined, elapsed, partial), "array": {"merged": done, "size": size}}
