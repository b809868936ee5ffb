"""Reading PyTorch checkpoint files without ever unpickling arbitrary objects (``torch.load(weights_only=True)``), and
finding an adapter's folder in the layouts users hand over."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import torch


def load_weights_only(path: str | Path) -> Any:
    """The tensors and plain containers of a checkpoint; a file that needs arbitrary unpickling (possibly malicious)
    is refused with one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise refused(path) from None


def refused(path: str | Path) -> ValueError:
    """The one-line error for a checkpoint that ``torch.load(weights_only=True)`` would not read."""
    return ValueError(f"{path} is not a weights-only checkpoint (it needs arbitrary unpickling, refused for safety); "
                      f"give a safetensors file or a checkpoint of tensors")


def adapter_folder(path: Path, subdir: str, holds: Callable[[Path], bool], what: str, give: str) -> Path:
    """The folder at or under ``path`` that ``holds`` an adapter: ``path`` itself, ``<subdir>``, ``models/<subdir>``
    (an official models folder), ``export/models/<subdir>`` (a training run) or ``export/`` (runs before the
    official layout); where none does, one error naming every place looked in and what to ``give`` instead."""
    for folder in (path, path / subdir, path / "models" / subdir, path / "export" / "models" / subdir, path / "export"):
        if folder.is_dir() and holds(folder):
            return folder
    raise FileNotFoundError(f"{what} not found at {path} (nor in its {subdir}/, models/{subdir}/, "
                            f"export/models/{subdir}/ or export/); give {give}")
