"""Sample-grid helpers (distinct subjects for identities, tiling) and checkpoints by steps and time."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.io import TorchCheckpointIO

from blendexp.callbacks import Checkpoint, preview_order
from blendexp.images import image_grid
from tests.test_configs import resolved


def test_preview_picks_distinct_subjects_then_other_donors() -> None:
    subjects = ["a"] * 8 + ["b"] * 8 + ["c"] * 8 + ["d"] * 8
    order = preview_order(subjects, 3, 4)
    assert [subjects[i] for i in order[:3]] == ["a", "b", "c"]
    assert len(order) == 7 and all(subjects[i] == "d" for i in order[3:])
    assert len(set(order)) == len(order)


def test_preview_with_one_subject_still_fills_the_grid() -> None:
    order = preview_order(["a"] * 8, 3, 4)
    assert order[0] == 0 and len(order) == 5 and len(set(order)) == 5


def test_image_grid_places_cells_and_leaves_blanks_white() -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    grid = np.asarray(image_grid([[None, red], [red, red]], pad=1))
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
    assert (grid[1:5, 1:5] == 255).all()  # blank cell
    assert (grid[1:5, 6:10, 0] == 255).all() and (grid[1:5, 6:10, 1] == 0).all()


def fit_with_checkpoint(root: Path, **kwargs: Any) -> list[int]:
    """Train Lightning's demo model 5 steps with ``Checkpoint(**kwargs)`` keeping every save; the saved steps."""
    ckpt = Checkpoint(dirpath=root, save_top_k=-1, save_last=True, filename="{step}", **kwargs)
    trainer = L.Trainer(max_steps=5, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=root)
    trainer.fit(BoringModel())
    assert torch.load(root / "last.ckpt", weights_only=True)["global_step"] == 5  # last.ckpt: always the newest
    return sorted(int(p.stem.split("=")[1]) for p in root.glob("step=*.ckpt"))


def test_checkpoint_saves_by_steps_and_by_time(tmp_path: Path) -> None:
    assert fit_with_checkpoint(tmp_path / "steps", every_n_train_steps=2, every_minutes=None) == [2, 4]
    # an interval already over at every step: a save at each step, besides the step schedule
    assert fit_with_checkpoint(tmp_path / "time", every_n_train_steps=2, every_minutes=1e-9) == [1, 2, 3, 4, 5]


def test_checkpoint_rejects_negative_minutes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="callbacks.checkpoint.every_minutes must be >= 0"):
        Checkpoint(dirpath=tmp_path, every_minutes=-1)


def python_peak_bytes(save: Any, *args: Any) -> int:
    """Peak Python-heap memory allocated while ``save(*args)`` runs."""
    tracemalloc.start()
    try:
        save(*args)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_checkpoints_stream_to_disk_and_a_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    cfg, _ = resolved("train", [], tmp_path)
    io = instantiate(cfg.trainer, logger=False).strategy.checkpoint_io  # the Trainer users get
    state, mib = {"w": torch.arange(8 * 2**20, dtype=torch.float32)}, 2**20  # 32 MiB
    path = tmp_path / "ckpts" / "last.ckpt"
    # Lightning's own writer holds the whole serialised checkpoint in a buffer before it writes a byte
    assert python_peak_bytes(TorchCheckpointIO().save_checkpoint, state, tmp_path / "lightning.ckpt") > 32 * mib
    assert python_peak_bytes(io.save_checkpoint, state, path) < 4 * mib
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    with pytest.raises(Exception):  # an unpicklable object fails the save half-way
        io.save_checkpoint({"w": state["w"] + 1, "bad": lambda: 0}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], state["w"])
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind
