"""Annotated samples → shards: packing in task order, resume markers and journals, the build's reports.

The parent packs the workers' samples *in task order* into ``{source}-{index:06d}.tar`` shards of at most
``shard.maxcount`` samples and ``shard.maxsize`` bytes. A shard is written under a temporary name and renamed when
complete; then a done marker records where the next shard starts (task, sample offset), and a journal records each
task's rejects and counts. A re-run keeps finished shards and resumes at the first unfinished one; every step is
deterministic (tar mtimes fixed), so the shards are byte-identical to an uninterrupted build. Used by the build's
entry point (build.py) and by array builds (array.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blendexp.data.format import FORMAT_VERSION
from blendexp.results import write_atomic

if TYPE_CHECKING:
    from blendexp.data.inputs import Task

log = logging.getLogger(__name__)
TAR_MTIME = 946684800  # 2000-01-01, an int: fixed member times give byte-identical shards (a float adds pax headers)
OUTPUT_KEYS = ("sources", "face", "video", "identity", "expression", "latents", "shard", "images_per_task",
               "shard_name", "shard_url")  # config that changes the shards (the resume fingerprint)


def is_remote(url: str) -> bool:
    """Shards written through a command or to an object store cannot be renamed or checked locally."""
    from blendexp.data.datamodule import REMOTE_PREFIXES

    return url.startswith(REMOTE_PREFIXES)


def tar_bytes(sample: Mapping[str, Any]) -> int:
    """Bytes a sample adds to a tar (a 512-byte header plus padded data per member), for ``shard.maxsize``."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))


def shard_url(cfg: Mapping[str, Any], source: str, index: int, part: int | None = None) -> str:
    """Where shard ``index`` goes: ``shard_url`` (any URL webdataset writes, e.g. pipe:) or ``out/shard_name``;
    ``{part}`` names the array part that wrote it (array.py)."""
    pattern = cfg["shard_url"] or str(Path(cfg["out"]) / cfg["shard_name"])
    return pattern.format(source=source, index=index, part=part)


@dataclass
class Packed:
    """What ``write_reports`` reads of one source's shards: task reports by task, then the shards' done markers."""

    reports: dict[int, dict[str, Any]]
    markers: list[dict[str, Any]]


class ShardPacker:
    """One source's shards: samples in task order, size limits, temp-then-rename, done markers and a journal."""

    def __init__(self, cfg: Mapping[str, Any], source: str, n_tasks: int) -> None:
        """Pick up where an earlier build of the same plan stopped (see the module docstring)."""
        self.cfg, self.source, self.n_tasks = cfg, source, n_tasks
        self.work = Path(cfg["work_dir"])
        self.work.mkdir(parents=True, exist_ok=True)
        self.journal = self.work / f"{source}.journal.jsonl"
        self.markers: list[dict[str, Any]] = []
        while (m := self.work / f"{source}-{len(self.markers):06d}.done").exists():
            info = json.loads(m.read_text())
            if not is_remote(info["url"]) and not Path(info["url"]).is_file():
                break  # a finished shard was deleted since: rebuild from it
            self.markers.append(info)
        self.start: tuple[int, int] = tuple(self.markers[-1]["next"]) if self.markers else (0, 0)  # type: ignore
        done = self.work / f"{source}.complete"
        if done.exists() and json.loads(done.read_text())["shards"] == len(self.markers):
            self.start = (n_tasks, 0)
        lines = self.journal.read_text().splitlines() if self.journal.exists() else []
        reports = [json.loads(line) for line in lines if line.endswith("}")]  # a killed write leaves half a line
        self.reports = {r["task"]: r for r in reports if r["task"] < self.start[0]}
        write_atomic(self.journal, "".join(json.dumps(self.reports[t]) + "\n" for t in sorted(self.reports)))
        self.writer: Any = None
        self.tmp = Path()
        self.count = self.size = 0

    @property
    def complete(self) -> bool:
        """All tasks are packed and every shard is closed."""
        return self.start[0] >= self.n_tasks

    def url(self, index: int) -> str:
        """Where this packer's shard ``index`` goes."""
        return shard_url(self.cfg, self.source, index, self.cfg.get("part"))

    def _open(self) -> None:
        """Start the next shard under a temporary local name."""
        import webdataset as wds

        url = self.url(len(self.markers))
        self.tmp = (self.work / f"{self.source}-{len(self.markers):06d}.tar") if is_remote(url) else Path(url)
        self.tmp = self.tmp.with_name(self.tmp.name + ".tmp")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=TAR_MTIME)

    def _close(self, next_start: tuple[int, int]) -> None:
        """Finish the open shard: rename (or upload) it, then write its done marker naming where the next starts."""
        import webdataset as wds

        self.writer.close()
        self.writer = None
        url = self.url(len(self.markers))
        if is_remote(url):
            with open(self.tmp, "rb") as src, wds.gopen(url, "wb") as dst:
                shutil.copyfileobj(src, dst)
            self.tmp.unlink()
        else:
            os.replace(self.tmp, url)
        info = {"url": url, "count": self.count, "bytes": self.size, "next": list(next_start)}
        write_atomic(self.work / f"{self.source}-{len(self.markers):06d}.done", json.dumps(info))
        self.markers.append(info)
        self.start, self.count, self.size = next_start, 0, 0

    def add(self, task: Task, result: Mapping[str, Any]) -> None:
        """Append a task's samples (skipping those already in finished shards) and journal its report."""
        maxcount, maxsize = int(self.cfg["shard"]["maxcount"]), float(self.cfg["shard"]["maxsize"])
        for k, sample in enumerate(result["samples"]):
            if (task.index, k) < self.start:
                continue
            size = tar_bytes(sample)
            if self.writer is not None and (self.count >= maxcount or self.size + size > maxsize):
                self._close((task.index, k))
            if self.writer is None:
                self._open()
            self.writer.write(sample)
            self.count, self.size = self.count + 1, self.size + size
        metas = [json.loads(s["json"]) for s in result["samples"]]
        report = {"task": task.index, "inputs": len(task.items), "frames": result["frames"],
                  "rejects": result["rejects"], "face_px": result["face_px"], "box_crops": result["box_crops"],
                  "subjects": Counter(m["subject"] for m in metas),
                  "clips": Counter(f"{m['subject']}/{m['clip']}" for m in metas if m["clip"] is not None)}
        self.reports[task.index] = report
        with self.journal.open("a") as f:
            f.write(json.dumps(report) + "\n")
        if task.index == self.n_tasks - 1:
            self.finish()

    def finish(self) -> None:
        """Close the last shard and mark the source complete once every task is packed."""
        if self.writer is not None:
            self._close((self.n_tasks, 0))
        if len(self.reports) == self.n_tasks:
            write_atomic(self.work / f"{self.source}.complete", json.dumps({"shards": len(self.markers)}))
            self.start = (self.n_tasks, 0)


def brace_form(urls: list[str]) -> str:
    """``a-{000000..000012}.tar`` for consecutive shard URLs: the form data configs and webdataset accept ('' when
    the URLs are not one consecutive run, e.g. a partial array merge)."""
    import webdataset as wds

    if len(urls) < 2:
        return urls[0] if urls else ""
    a, b = urls[0], urls[-1]
    i, j = len(os.path.commonprefix([a, b])), len(os.path.commonprefix([a[::-1], b[::-1]]))
    while i > 0 and a[i - 1].isdigit():
        i -= 1
    while j > 0 and a[len(a) - j].isdigit():
        j -= 1
    brace = f"{a[:i]}{{{a[i:len(a) - j]}..{b[i:len(b) - j]}}}{a[len(a) - j:]}"
    return brace if wds.shardlists.expand_urls(brace) == urls else ""


def plan_fingerprint(cfg: Mapping[str, Any], plan: dict[str, list[Task]]) -> tuple[str, dict[str, Any]]:
    """A hash of the inputs (paths, sizes, mtimes) and of the settings that change the shards, and those settings."""
    from blendexp.data.annotate import BUILDER_VERSION

    def stat(path: str) -> list[int]:
        """Size and mtime, so edited inputs change the fingerprint (-1 for a missing file)."""
        try:
            st = os.stat(path)
        except OSError:
            return [-1, -1]
        return [st.st_size, st.st_mtime_ns]

    inputs = [[i.path, *stat(i.path)] for tasks in plan.values() for t in tasks for i in t.items]
    settings = {k: cfg.get(k) for k in OUTPUT_KEYS} | {"model_ids": cfg["model_ids"], "builder": BUILDER_VERSION}
    return hashlib.sha256(json.dumps([settings, inputs], sort_keys=True).encode()).hexdigest(), settings


def check_plan(cfg: Mapping[str, Any], plan: dict[str, list[Task]]) -> None:
    """Refuse to resume a build made from other inputs or settings (unless ``overwrite``), then record this plan."""
    fingerprint, settings = plan_fingerprint(cfg, plan)
    work = Path(cfg["work_dir"])
    path = work / "plan.json"
    if path.exists() and json.loads(path.read_text())["fingerprint"] != fingerprint:
        if not cfg["overwrite"]:
            raise ValueError(f"{cfg['out']} holds a build made from other inputs or settings (see {path}); re-run "
                             "with overwrite=true to discard it, or choose another out=")
        for marker in work.glob("*.done"):
            url = json.loads(marker.read_text())["url"]
            if not is_remote(url):
                Path(url).unlink(missing_ok=True)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=2, sort_keys=True))


def write_reports(cfg: Mapping[str, Any], packers: Mapping[str, ShardPacker | Packed], elapsed: float,
                  partial: dict[str, Any] | None = None) -> dict[str, Any]:
    """manifest.json (shards and counts per source, subject, clip), rejects.jsonl and stats.json in ``out``;
    ``partial`` (an array merge of only some parts) is recorded in the manifest."""
    from blendexp.data.annotate import BUILDER_VERSION, REASONS

    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "builder": BUILDER_VERSION,
                                "image_size": int(cfg["face"]["size"]), "models": cfg["model_ids"],
                                "toy_models": cfg["toy_models"], "warnings": cfg["warnings"],
                                "smirk_crop": cfg["expression"]["crop"], "sources": {}}
    if partial:
        manifest["partial"] = partial
    stats: dict[str, Any] = {"elapsed_s": round(elapsed, 2), "num_workers": cfg["num_workers"], "sources": {}}
    rejects: list[str] = []
    for source, packer in packers.items():
        reports = [packer.reports[t] for t in sorted(packer.reports)]
        subjects, clips, reasons = Counter(), Counter(), Counter()
        for r in reports:
            subjects.update(r["subjects"])
            clips.update(r["clips"])
            reasons.update(x["reason"] for x in r["rejects"])
            rejects += [json.dumps(x) + "\n" for x in r["rejects"]]
        urls = [m["url"] for m in packer.markers]
        samples = sum(m["count"] for m in packer.markers)
        px = [v for r in reports for v in r["face_px"]]
        manifest["sources"][source] = {"shards": urls, "brace": brace_form(urls), "samples": samples,
                                       "subjects": dict(sorted(subjects.items())), "clips": dict(sorted(clips.items()))}
        stats["sources"][source] = {
            "inputs": sum(r["inputs"] for r in reports), "frames": sum(r["frames"] for r in reports),
            "samples": samples, "shards": len(urls), "bytes": sum(m["bytes"] for m in packer.markers),
            "rejects": {k: reasons[k] for k in REASONS if reasons[k]},
            "face_px": {"min": min(px), "median": float(np.median(px)), "max": max(px)} if px else None,
            "smirk_box_crops": sum(r.get("box_crops", 0) for r in reports)}  # faces the mesh missed
        if not samples and stats["sources"][source]["inputs"]:  # (an array part may hold no inputs of a source)
            log.warning("source %s produced no samples; see %s", source, out / "rejects.jsonl")
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    write_atomic(out / "rejects.jsonl", "".join(rejects))
    write_atomic(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True))
    return {"out": str(out), "manifest": manifest, "stats": stats}


def pack(c: dict[str, Any], plan: dict[str, list[Task]]) -> dict[str, Any]:
    """Annotate the plan's unfinished tasks and pack them into shards in task order, then write the reports."""
    from tqdm import tqdm

    from blendexp.data.annotate import annotate

    check_plan(c, plan)
    packers = {source: ShardPacker(c, source, len(tasks)) for source, tasks in plan.items()}
    todo = [t for s, tasks in plan.items() for t in tasks if t.index >= packers[s].start[0]]
    done = sum(len(tasks) for tasks in plan.values()) - len(todo)
    if done:
        log.info("resuming: %d of %d tasks are already in finished shards", done, done + len(todo))
    start = time.perf_counter()
    with tqdm(total=sum(len(t.items) for t in todo), desc="build", unit="input", disable=None) as bar:
        for task, result in annotate(c, todo):
            packers[task.source].add(task, result)
            bar.update(len(task.items))
    for packer in packers.values():
        packer.finish()
    return write_reports(c, packers, time.perf_counter() - start)
