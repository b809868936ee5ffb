"""Sample-grid helpers: distinct subjects for identities, tiling."""

from __future__ import annotations

import numpy as np

from blendexp.callbacks import image_grid, preview_order


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
