"""The evaluation test set: source faces × target expressions, read from image folders, shards or FLAME files.

Sources are a folder of face images (e.g. Synth-500, AgeDB) or shards in the shard contract. Targets are driving
images (their FLAME vector is re-extracted with SMIRK), shards (their ``exp.npy``), or FLAME vectors in ``.npy``
(``(55,)`` or ``(K, 55)``) / ``.json`` files (a list of 55 numbers, a list of such lists, or ``{name: [55 numbers]}``).
Every input gets a stable, file-system-safe name: generated images are stored and looked up by these names.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from blendexp.data.datamodule import expand_shards, read_tars
from blendexp.data.format import EXP_DIM, CorruptSample, check_vector, decode_sample

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FLAME_EXTS = (".npy", ".json")


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


@dataclass
class Target:
    """A target expression: the FLAME vector (55,) and the image it came from when there is one (for grids)."""

    name: str
    origin: str
    exp: np.ndarray
    image: np.ndarray | None = None


def safe_name(text: str) -> str:
    """A name usable as one path component on every file system (cached generations are stored under it)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    if not name:
        raise ValueError(f"cannot make a file name from {text!r}")
    return name


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
    return folder.is_dir() and any(folder.glob("*.tar")) and not any(_image_files(folder))


def check_input(path: str | Path, role: str) -> None:
    """Fail on a missing input before any model loads, naming the path and what is expected there."""
    if is_shards(path):
        expand_shards(str(path), what=f"{role}s")
    elif not Path(path).exists():
        also = ", or FLAME .npy/.json files" if role == "target" else ""
        raise FileNotFoundError(f"eval.{role}s.path: {path} does not exist; give a folder of face images or .tar "
                                f"shards{also}")
    elif not os.access(path, os.R_OK | (os.X_OK if Path(path).is_dir() else 0)):
        raise PermissionError(f"eval.{role}s.path: {path} cannot be read (permission denied)")


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name so runs are reproducible."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def load_image(path: str | Path, what: str = "image") -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; a missing, unreadable or undecodable file is one error naming it."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (IsADirectoryError, PermissionError) as err:
        raise ValueError(f"{what} {path} cannot be read ({err.strerror.lower()}); give a JPEG or PNG photo") from None
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError, truncated or malformed files
        raise ValueError(f"{what} {path} does not decode as an image ({type(err).__name__}); give a JPEG or PNG "
                         f"photo") from None


def _folder_images(folder: Path, skipped: list[Skipped], role: str) -> Iterator[InputImage]:
    """Images of a folder; unreadable files are listed as skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{role}s: {folder} does not exist; give a folder of face images or .tar shards")
    files = _image_files(folder)
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


def _flame_rows(data: Any, path: Path) -> list[tuple[str, Any]]:
    """(suffix, vector) pairs of a FLAME file's content; a single vector gets no suffix."""
    if isinstance(data, dict):
        data = data.get("exp", data)
    if isinstance(data, dict):
        return [(str(k), v) for k, v in data.items()]
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"FLAME file {path} does not hold numbers of shape ({EXP_DIM},) or (K, {EXP_DIM}): {err}") from err
    if arr.ndim == 1:
        return [("", arr)]
    if arr.ndim == 2:
        return [(str(i), row) for i, row in enumerate(arr)]
    raise ValueError(f"FLAME file {path} holds an array of shape {arr.shape}; expected ({EXP_DIM},) or (K, {EXP_DIM})")


def read_flame_file(path: str | Path) -> list[Target]:
    """Targets from one ``.npy`` / ``.json`` FLAME file; a vector of the wrong length fails naming the file."""
    path = Path(path)
    try:
        data: Any = np.load(path, allow_pickle=False) if path.suffix == ".npy" else json.loads(path.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"cannot read FLAME file {path}: {err}") from err
    rows = _flame_rows(data, path)
    return [Target(name=safe_name(f"{path.stem}-{suffix}" if suffix else path.stem), origin=str(path),
                   exp=check_vector(vec, EXP_DIM, "FLAME vector", f"{path}{f' [{suffix}]' if suffix else ''}"))
            for suffix, vec in rows]


def flame_files(path: Path) -> list[Path] | None:
    """The FLAME files a target path means (one file, or every .npy/.json of a folder); None if it is not one."""
    if path.is_file() and path.suffix in FLAME_EXTS:
        return [path]
    if path.is_dir() and not is_shards(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FLAME_EXTS)
        if files and not _image_files(path):
            return files
    return None
