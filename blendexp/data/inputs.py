"""What a build annotates: input sources listed into items (images, videos) and cut into deterministic tasks.

A source is a folder (recursive), a glob, one media file or a list file (``path[TAB subject]``); the subject of an
item comes from the list file, a subject map, else its folder name (files directly in the source folder: their own
name). Videos are one task each; images are grouped ``images_per_task`` at a time.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
LIST_EXTS = (".txt", ".lst")

@dataclass(frozen=True)
class Item:
    """One input file: an image (one sample) or a video (one clip of one tracked subject)."""

    source: str
    path: str  # where it is read from
    rel: str  # recorded in the json: relative to the source's root, so shards do not depend on the machine
    subject: str
    name: str  # clip id (videos) or image name (stills), unique within (source, subject)
    video: bool


@dataclass(frozen=True)
class Task:
    """A unit of work: consecutive images or one video of one source, always cut the same way."""

    source: str
    index: int
    items: tuple[Item, ...]


def safe_part(name: str) -> str:
    """A key part from a file or folder name: keys may hold only letters, digits, '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def _walk(folder: Path) -> list[Path]:
    """Files under ``folder``, sorted, plus every folder that cannot be read (the builder rejects those as
    ``unreadable`` instead of leaving them out silently, as ``rglob`` does)."""
    unreadable: list[Path] = []
    files = [Path(top) / name for top, _, names in os.walk(folder, onerror=lambda e: unreadable.append(Path(e.filename)))
             for name in names]
    return sorted(p for p in files if p.is_file()) + sorted(unreadable)


SUBJECT_RULES = ("auto", "parent", "stem")


def read_subject_map(path: str | Path, source: str) -> dict[str, str]:
    """A subject map: CSV (``file,subject`` per row, a header row allowed) or JSON (``{file: subject}``); files are
    paths relative to the source's root (or bare file names)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sources.{source}.subject_map: {file} does not exist; give a CSV (file,subject) or "
                                f"JSON ({{file: subject}}) file")
    if file.suffix.lower() == ".json":
        mapping = json.loads(file.read_text())
        if not isinstance(mapping, dict):
            raise ValueError(f"sources.{source}.subject_map: {file} must hold one JSON object {{file: subject}}")
        return {str(k): str(v) for k, v in mapping.items()}
    rows = [r for r in csv.reader(file.read_text().splitlines()) if r and not r[0].lstrip().startswith("#")]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise ValueError(f"sources.{source}.subject_map: {file} line {bad[0]} is not 'file,subject'")
    return {r[0].strip(): r[1].strip() for r in rows if (r[0].strip(), r[1].strip()) != ("file", "subject")}


def subject_of(path: Path, root: Path, rule: str, mapping: Mapping[str, str]) -> str:
    """An item's subject: the subject map's entry (by relative path, then file name), else by ``rule``: ``auto``
    takes the folder name below the root and the file name for files directly in it (a flat folder of stills is
    one subject per photo), ``parent`` always the folder name, ``stem`` always the file name."""
    rel = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
    listed = mapping.get(rel) or mapping.get(path.name)
    if listed:
        return listed
    if rule == "stem" or (rule == "auto" and path.parent == root):
        return path.stem
    return path.parent.name


def list_inputs(source: str, src: Mapping[str, Any]) -> list[Item]:
    """The items of one source: a folder (recursive), a glob, one media file, or a list file (path[TAB subject])."""
    spec, rule = src.get("inputs"), src.get("subject", "auto")
    if not spec:
        raise ValueError(f"sources.{source}.inputs is not set; give a folder, glob, media file or list file")
    if rule not in SUBJECT_RULES:
        raise ValueError(f"sources.{source}.subject={rule!r}; choose 'auto' (folder name, file name for files "
                         f"directly in the source folder), 'parent' (folder name) or 'stem' (file name)")
    mapping = read_subject_map(src["subject_map"], source) if src.get("subject_map") else {}
    media = IMAGE_EXTS + VIDEO_EXTS
    spec_path = Path(str(spec))
    entries: list[tuple[Path, str | None]]
    if any(c in str(spec) for c in "*?["):
        root = Path(re.split(r"[*?\[]", str(spec))[0]).parent
        entries = [(Path(p), None) for p in sorted(glob.glob(str(spec), recursive=True)) if Path(p).is_file()]
    elif spec_path.is_dir():
        root = spec_path
        entries = [(p, None) for p in _walk(spec_path) if p.suffix.lower() in media or p.is_dir()]
    elif spec_path.is_file() and spec_path.suffix.lower() in LIST_EXTS:
        root, entries = spec_path.parent, []
        for line in spec_path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                path, _, subject = line.rstrip("\n").partition("\t")
                entries.append((root / path.strip(), subject.strip() or None))
    elif spec_path.is_file():
        root, entries = spec_path.parent, [(spec_path, None)]
    else:
        raise FileNotFoundError(f"sources.{source}.inputs: {spec} does not exist; expected a folder of images/"
                                f"videos, a glob, a media file or a list file ({'/'.join(LIST_EXTS)})")
    if not entries:
        raise FileNotFoundError(f"sources.{source}.inputs: no images ({' '.join(IMAGE_EXTS)}) or videos "
                                f"({' '.join(VIDEO_EXTS)}) found at {spec}")
    items, seen = [], Counter()
    for path, listed in entries:
        subject = safe_part(listed or subject_of(path, root, rule, mapping))
        name = safe_part(path.stem)
        seen[subject, name] += 1
        name = name if seen[subject, name] == 1 else f"{name}-{seen[subject, name]}"
        rel = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
        items.append(Item(source, str(path), rel, subject, name, path.suffix.lower() in VIDEO_EXTS))
    return items


def plan_tasks(cfg: Mapping[str, Any]) -> dict[str, list[Task]]:
    """Cut every source into tasks deterministically: runs of ``images_per_task`` images, each video alone."""
    if not cfg.get("sources"):
        raise ValueError("no sources configured; add e.g. +sources.photos.inputs=/data/raw/photos")
    plan: dict[str, list[Task]] = {}
    for source, src in cfg["sources"].items():
        if safe_part(source) != source:
            raise ValueError(f"source name {source!r} may hold only letters, digits, '_' and '-'")
        tasks: list[Task] = []
        chunk: list[Item] = []
        for item in list_inputs(source, src):
            if item.video or len(chunk) == int(cfg["images_per_task"]):
                if chunk:
                    tasks.append(Task(source, len(tasks), tuple(chunk)))
                chunk = []
            if item.video:
                tasks.append(Task(source, len(tasks), (item,)))
            else:
                chunk.append(item)
        if chunk:
            tasks.append(Task(source, len(tasks), tuple(chunk)))
        plan[source] = tasks
    return plan


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, turned upright by its EXIF orientation like photo viewers do."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def iter_frames(item: Item, stride: int, max_frames: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, RGB frame): the image itself, or every ``stride``-th video frame up to ``max_frames``."""
    if not item.video:
        yield 0, read_image(item.path)
        return
    with av.open(item.path) as container:
        taken = 0
        for index, frame in enumerate(container.decode(video=0)):
            if index % stride == 0:
                yield index, frame.to_ndarray(format="rgb24")
                taken += 1
                if max_frames and taken >= max_frames:
                    return
