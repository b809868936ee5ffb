"""Named face images read from a folder of images or from shards in the shard contract: the evaluation's sources and
targets, and the pipeline's identity from shards. Every image gets a stable, file-system-safe name (generated images
are stored and looked up by it); an unreadable or corrupt one is listed as skipped, never dropped silently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from blendexp.data.datamodule import expand_shards, read_tars
from blendexp.data.format import CorruptSample, decode_sample
from blendexp.flame import safe_name
from blendexp.images import IMAGE_EXTS, load_image


@dataclass
class InputImage:
    """One image read for the test set, with where it came from (reported when it is skipped)."""

    name: str
    origin: str  # a file path, or "<shard>#<key>" for a shard member
    image: np.ndarray  # (H, W, 3) uint8 RGB
    exp: np.ndarray | None = None  # (55,) FLAME vector stored next to a shard image
    subject: str | None = None


@dataclass
class Skipped:
    """An input left out of the evaluation, listed in the report so nothing disappears silently."""

    role: str  # "source" or "target"
    origin: str
    reason: str


def _check_unique(names: list[str], origins: list[str], what: str) -> None:
    """Two inputs with one name would share cached images; fail naming both files."""
    counts = Counter(names)
    for name, n in counts.items():
        if n > 1:
            clash = [o for nm, o in zip(names, origins) if nm == name]
            raise ValueError(f"{what}: {n} inputs are named {name!r} ({', '.join(clash)}); rename one of them")


def is_shards(path: str | Path) -> bool:
    """Shards are ``.tar`` files, brace/glob patterns of them, or a folder that holds ``.tar`` files and no images."""
    text = str(path)
    if text.endswith(".tar") or "{" in text or "*" in text:
        return True
    folder = Path(text)
    return folder.is_dir() and any(folder.glob("*.tar")) and not any(image_files(folder))


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name so runs are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _folder_images(folder: Path, skipped: list[Skipped], role: str) -> Iterator[InputImage]:
    """Images of a folder; unreadable files are listed as skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{role}s: {folder} does not exist; give a folder of face images or .tar shards")
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"{role}s: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    for path in files:
        try:
            yield InputImage(name=safe_name(path.stem), origin=str(path), image=load_image(path))
        except (OSError, ValueError) as err:
            skipped.append(Skipped(role, str(path), f"unreadable image: {err}"))


def _shard_images(spec: str, skipped: list[Skipped], role: str) -> Iterator[InputImage]:
    """Samples of shards in the shard contract; corrupt members are listed as skipped."""
    for raw in read_tars(expand_shards(spec, what=f"{role}s")):
        origin = f"{raw['__url__']}#{raw.get('__key__', '?')}"
        if "__error__" in raw:
            skipped.append(Skipped(role, raw["__url__"], raw["__error__"]))
            continue
        try:
            sample = decode_sample(raw)
        except CorruptSample as err:
            skipped.append(Skipped(role, origin, str(err)))
            continue
        yield InputImage(name=safe_name(sample.key.replace("/", "-")), origin=origin, image=sample.image,
                         exp=sample.exp, subject=sample.subject)


def read_images(path: str | Path, role: str, skipped: list[Skipped], limit: int | None = None, offset: int = 0,
                per_subject: int | None = None) -> list[InputImage]:
    """Images from a folder or shards: at most ``per_subject`` per subject (shards), then ``[offset:offset+limit]``."""
    items = _shard_images(str(path), skipped, role) if is_shards(path) else _folder_images(Path(path), skipped, role)
    seen: Counter[str] = Counter()
    out: list[InputImage] = []
    for item in items:
        if per_subject is not None and item.subject is not None:
            if seen[item.subject] >= per_subject:
                continue
            seen[item.subject] += 1
        out.append(item)
        if limit is not None and len(out) >= offset + limit:
            break
    out = out[offset:]
    _check_unique([i.name for i in out], [i.origin for i in out], f"{role}s from {path}")
    return out
