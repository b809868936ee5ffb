"""Reading the test set: FLAME files (and their errors), image folders and shard subsets, with stable names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blendexp.data.image_sets import Skipped, read_images
from blendexp.eval.inputs import check_input, flame_files, flame_targets
from blendexp.flame import read_flame_file
from tests.conftest import REPO

SAMPLE = REPO / "data" / "sample" / "val-000000.tar"


def test_flame_files_in_every_accepted_form(tmp_path: Path) -> None:
    vec = np.linspace(-1, 1, 55).astype(np.float32)
    np.save(tmp_path / "smile.npy", vec)
    np.save(tmp_path / "clip.npy", np.stack([vec, -vec]))
    (tmp_path / "named.json").write_text(json.dumps({"open mouth": vec.tolist()}))
    (tmp_path / "list.json").write_text(json.dumps([vec.tolist()]))
    files = flame_files(tmp_path)
    assert files is not None
    targets = {t.name: t for f in files for t in flame_targets(f)}
    assert sorted(targets) == ["clip-0", "clip-1", "list-0", "named-open-mouth", "smile"]
    np.testing.assert_array_equal(targets["clip-1"].exp, -vec)
    assert targets["smile"].image is None and targets["smile"].origin == str(tmp_path / "smile.npy")


@pytest.mark.parametrize("name, content", [("short.npy", np.zeros(54, np.float32)), ("rows.npy", np.zeros((2, 56))),
                                           ("short.json", [0.0] * 54)])
def test_flame_file_of_wrong_length_names_the_file_and_55(tmp_path: Path, name: str, content) -> None:
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, content)
    else:
        path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="55") as info:
        read_flame_file(path)
    assert str(path) in str(info.value)


def test_image_folder_names_and_unreadable_files(tmp_path: Path) -> None:
    for name in ("b face.png", "a.jpg"):
        Image.new("RGB", (32, 32), "gray").save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    skipped: list[Skipped] = []
    images = read_images(tmp_path, "source", skipped)
    assert [i.name for i in images] == ["a", "b-face"]
    assert [(s.origin, s.role) for s in skipped] == [(str(tmp_path / "broken.png"), "source")]
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")  # a.jpg and a.png would share cached images
    with pytest.raises(ValueError, match="a.jpg"):
        read_images(tmp_path, "source", [])


def test_shard_subsets_pick_subjects_then_offset_and_limit() -> None:
    everyone = read_images(SAMPLE, "source", [], per_subject=1)
    assert len(everyone) == 8 and len({i.subject for i in everyone}) == 8
    picked = read_images(SAMPLE, "target", [], per_subject=1, offset=3, limit=2)
    assert [i.name for i in picked] == [i.name for i in everyone[3:5]]
    assert all(i.exp is not None and i.exp.shape == (55,) for i in picked)
    assert picked[0].origin.endswith("val-000000.tar#" + picked[0].name.replace("-", "/"))


@pytest.mark.parametrize("role", ["source", "target"])
def test_missing_input_path_names_the_key_and_path(tmp_path: Path, role: str) -> None:
    with pytest.raises(FileNotFoundError, match=f"eval.{role}s.path: {tmp_path / 'nope'} does not exist"):
        check_input(tmp_path / "nope", role)
    with pytest.raises(FileNotFoundError, match=f"{role}s: shard .*shards-000.tar does not exist"):
        check_input(tmp_path / "shards-{000..001}.tar", role)
