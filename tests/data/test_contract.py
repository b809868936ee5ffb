"""The shard contract enforced on read: every violation is skipped and counted by reason, in training and
evaluation, and a shard list with no usable member stops with one line naming the shards and the reasons."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blendexp.data.datamodule import FaceDataModule
from blendexp.data.format import NORM_TOLERANCE
from blendexp.data.image_sets import read_images
from blendexp.flame import ID_DIM
from tests.conftest import run_cli
from tests.data.conftest import face_sample, members_of, write_tar

SIZE = 16


def npy(arr: np.ndarray) -> bytes:
    """An ``.npy`` member holding ``arr`` as it is (no reshaping, no normalising)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def jpeg(mode: str, size: int) -> bytes:
    """A JPEG of the given PIL mode and size."""
    buf = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buf, format="JPEG")
    return buf.getvalue()


def unit_id() -> np.ndarray:
    """A valid (512,) unit identity embedding."""
    v = np.random.default_rng(0).standard_normal(ID_DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def scrambled_id() -> np.ndarray:
    """(256, 2): 512 values, but not the contract's shape (the loader once flattened it)."""
    return unit_id().reshape(256, 2)


VIOLATIONS = {  # name: (replaced members, reason counted)
    "id shape (256, 2)": ({"id.npy": npy(scrambled_id())}, "shape"),
    "id shape (511,)": ({"id.npy": npy(unit_id()[:511])}, "shape"),
    "id NaN": ({"id.npy": npy(np.where(np.arange(ID_DIM) == 3, np.nan, unit_id()).astype(np.float32))}, "non-finite"),
    "id norm 226": ({"id.npy": npy(unit_id() * 226)}, "norm"),
    "id zeros": ({"id.npy": npy(np.zeros(ID_DIM, np.float32))}, "norm"),
    "id norm off by 10x tolerance": ({"id.npy": npy(unit_id() * (1 + 10 * NORM_TOLERANCE))}, "norm"),
    "exp shape (55, 1)": ({"exp.npy": npy(np.zeros((55, 1), np.float32))}, "shape"),
    "exp shape (54,)": ({"exp.npy": npy(np.zeros(54, np.float32))}, "shape"),
    "exp Inf": ({"exp.npy": npy(np.full(55, np.inf, np.float32))}, "non-finite"),
    "jpg undecodable": ({"jpg": b"\xff\xd8 not a jpeg"}, "decode"),
    "jpg grayscale": ({"jpg": jpeg("L", SIZE)}, "shape"),
    "jpg not the declared size": ({"jpg": jpeg("RGB", SIZE * 2), "json": b'{"size": 16}'}, "shape"),
    "id.npy missing": ({"id.npy": None}, "missing"),
}


def mixed_shard(path: Path, replace: dict[str, bytes | None]) -> Path:
    """Two good samples around one sample whose members are replaced."""
    good = [face_sample("s", f"p{i}", None, i) for i in range(2)]
    bad = face_sample("s", "bad", None, 9)
    return write_tar(path, members_of(good[0]) + members_of(bad, **replace) + members_of(good[1]))


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_each_violation_is_skipped_and_counted_by_reason(tmp_path: Path, name: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    replace, reason = VIOLATIONS[name]
    shard = str(mixed_shard(tmp_path / "mixed.tar", replace))
    dm = FaceDataModule({"a": {"shards": [shard]}}, val_shards=[shard], image_size=SIZE, batch_size=4)
    with caplog.at_level(logging.WARNING):
        batches = list(dm.eval_dataloader())
    assert [k for b in batches for k in b["key"]] == ["s/p0/img0/000000", "s/p1/img1/000000"]
    assert sum(int(b["skipped"].sum()) for b in batches) == 1
    assert f"data source val: skipped 1 unusable samples ({reason} 1)" in caplog.text
    # Evaluation reads shards through the same contract: the member is listed as skipped, not scored.
    skipped: list = []
    assert [i.origin.split("#")[1] for i in read_images(shard, "source", skipped)] == ["s/p0/img0/000000",
                                                                                      "s/p1/img1/000000"]
    assert [s.origin for s in skipped] == [f"{shard}#s/bad/img9/000000"]


def test_skip_warnings_are_summarised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    members = members_of(face_sample("s", "good", None, 0))
    for i in range(30):
        members += members_of(face_sample("s", f"b{i}", None, i), **{"id.npy": npy(unit_id() * 2)})
    shard = str(write_tar(tmp_path / "many.tar", members))
    dm = FaceDataModule({"a": {"shards": [shard]}}, val_shards=[shard], image_size=SIZE, batch_size=4)
    with caplog.at_level(logging.WARNING):
        assert sum(int(b["skipped"].sum()) for b in dm.eval_dataloader()) == 30
    lines = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(lines) == 3  # after 1 and 10 skips, and once at the end of the pass: not 30 lines
    assert lines[-1].startswith("data source val: skipped 30 unusable samples (norm 30); end of pass")


def test_all_corrupt_shards_fail_with_one_line(toy_shards: Path, tiny_base, tmp_path: Path) -> None:
    members = []
    for i in range(4):
        members += members_of(face_sample("s", f"n{i}", None, i), **{"id.npy": npy(unit_id() * 226)})
        members += members_of(face_sample("s", f"z{i}", None, i), **{"id.npy": npy(scrambled_id())})
    bad = write_tar(tmp_path / "bad-000000.tar", members)
    models, sd15 = tiny_base
    res = run_cli("blendexp.train", "+experiment=expr_adapter", f"data.sources.stills.shards={bad}",
                  f"data.val_shards={toy_shards}/val-000000.tar", f"paths.models={models}", f"paths.sd15={sd15}",
                  f"paths.tiny_base={models.parent}", f"paths.outputs={tmp_path}", "data.num_workers=1",
                  "data.image_size=64", "+data.max_bad_run=40", "callbacks.samples=null", "trainer.max_steps=2")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "Caught" not in res.stderr and "DataLoader worker" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]  # progress bars go to stderr too
    assert len(lines) == 1
    assert lines[0].startswith("error: data source 'stills': 40 unusable samples in a row (")
    assert "norm 20" in lines[0] and "shape 20" in lines[0] and str(bad) in lines[0]
    assert sum("unusable" in line for line in res.stdout.splitlines()) <= 4  # summaries, not one line per member
