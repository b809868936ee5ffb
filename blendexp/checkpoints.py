"""Reading PyTorch checkpoint files without ever unpickling arbitrary objects (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

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
