"""The evaluation test set: source faces × target expressions, read from image folders, shards or FLAME files.

Sources are a folder of face images (e.g. Synth-500, AgeDB) or shards in the shard contract. Targets are driving
images (their FLAME vector is re-extracted with SMIRK), shards (their ``exp.npy``), or FLAME vectors in ``.npy``
(``(55,)`` or ``(K, 55)``) / ``.json`` files (a list of 55 numbers, a list of such lists, or ``{name: [55 numbers]}``).
Images are read by ``blendexp/data/image_sets.py``, FLAME files by ``blendexp/flame.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blendexp.data.datamodule import expand_shards
from blendexp.data.image_sets import image_files, is_shards
from blendexp.flame import FLAME_EXTS, read_flame_file


@dataclass
class Target:
    """A target expression: the FLAME vector (55,) and the image it came from when there is one (for grids)."""

    name: str
    origin: str
    exp: np.ndarray
    image: np.ndarray | None = None


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


def flame_targets(path: Path) -> list[Target]:
    """The targets of one FLAME file, each remembering the file it came from."""
    return [Target(name=name, origin=str(path), exp=exp) for name, exp in read_flame_file(path)]


def flame_files(path: Path) -> list[Path] | None:
    """The FLAME files a target path means (one file, or every .npy/.json of a folder); None if it is not one."""
    if path.is_file() and path.suffix in FLAME_EXTS:
        return [path]
    if path.is_dir() and not is_shards(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FLAME_EXTS)
        if files and not image_files(path):
            return files
    return None
