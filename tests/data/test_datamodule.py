"""FaceDataModule: exact counting of corrupt members, DDP x worker splitting, latents, pairs, mixing."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from blendexp.data.datamodule import FaceDataModule, FaceStream
from blendexp.flame import EXP_DIM
from tests.data.conftest import face_sample, members_of, write_tar

SIZE = 16


def good_members(n: int, source: str = "s", start: int = 0) -> list[tuple[str, bytes]]:
    """Members of ``n`` valid stills of distinct subjects."""
    return [m for i in range(start, start + n) for m in members_of(face_sample(source, f"p{i}", None, i))]


def good_shard(path: Path, n: int, source: str = "s", start: int = 0) -> Path:
    """A shard of ``n`` valid stills."""
    return write_tar(path, good_members(n, source, start))


def module(val: list[Path] | Path, **kw) -> FaceDataModule:
    """A DataModule over test shards at 16 px (the same shards serve training and evaluation)."""
    shards = [str(p) for p in (val if isinstance(val, list) else [val])]
    return FaceDataModule({"a": {"shards": shards}}, val_shards=shards, image_size=SIZE, batch_size=4, **kw)


def one_pass(dm: FaceDataModule, num_workers: int = 0, rank: int | None = None, world: int | None = None
             ) -> tuple[list[str], int]:
    """(keys, summed ``skipped``) of one evaluation pass through a real DataLoader."""
    dm.num_workers = num_workers
    keys, skipped = [], 0
    for batch in dm.eval_dataloader(rank, world):
        keys += batch["key"]
        skipped += int(batch["skipped"].sum())
    return keys, skipped


@pytest.fixture(scope="module")
def corrupt_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 good samples with 6 bad member groups between them, each of which must count exactly once."""
    good = [face_sample("s", f"p{i}", None, i) for i in range(8)]
    bad = [face_sample("s", f"bad{i}", None, i) for i in range(5)]
    members = members_of(good[0]) + members_of(bad[0], jpg=b"\xff\xd8 not a jpeg") + members_of(good[1])
    members += members_of(bad[1], **{"id.npy": None}) + members_of(good[2]) + members_of(good[3])
    short_exp = io.BytesIO()
    np.save(short_exp, np.zeros(EXP_DIM - 1, np.float32))
    members += members_of(bad[2], **{"exp.npy": short_exp.getvalue()}) + members_of(bad[3], json=b"[1, 2]")
    members += members_of(good[4]) + [("stray-file-without-extension", b"junk")] + members_of(good[5])
    members += members_of(bad[4], **{"id.npy": b"not an npy"}) + members_of(good[6]) + members_of(good[7])
    return write_tar(tmp_path_factory.mktemp("corrupt") / "mixed.tar", members)


def test_corrupt_members_are_skipped_and_counted_exactly(corrupt_shard: Path) -> None:
    keys, skipped = one_pass(module(corrupt_shard))
    assert keys == [f"s/p{i}/img{i}/000000" for i in range(8)] and skipped == 6


def _cut(shard: Path, out: Path, where: str) -> Path:
    """A copy of a 6-sample shard cut inside sample 3 (members 12..15) at a chosen kind of place."""
    members = tarfile.open(shard).getmembers()
    point = {"mid-data": members[13].offset_data + 10, "member boundary": members[13].offset,
             "sample boundary": members[12].offset, "mid-header": members[13].offset + 100,
             "end marker lost": members[-1].offset_data + 512}[where]
    out.write_bytes(shard.read_bytes()[:point])
    return out


# A cut-off tar cannot vouch for the sample it was reading when it ended (a trailing optional member such as
# latents.npy may be gone), so that sample and everything after it are the one counted tail.
@pytest.mark.parametrize("where, n_good", [("mid-data", 3), ("member boundary", 3), ("sample boundary", 2),
                                           ("mid-header", 3), ("end marker lost", 5)])
def test_truncated_tar_counts_its_tail_once(tmp_path: Path, where: str, n_good: int) -> None:
    cut = _cut(good_shard(tmp_path / "full.tar", 6), tmp_path / "cut.tar", where)
    keys, skipped = one_pass(module([cut, good_shard(tmp_path / "next.tar", 2, start=10)]))
    assert keys == [f"s/p{i}/img{i}/000000" for i in [*range(n_good), 10, 11]]
    assert skipped == 1


def test_unreadable_urls_count_once_each(tmp_path: Path) -> None:
    urls = [str(good_shard(tmp_path / "a.tar", 2)), "pipe:exit 3", str(tmp_path / "gone.tar")]
    stream = FaceStream(urls, "a", SIZE, endless=False)
    items = list(stream)
    assert len(items) == 2 and sum(i["skipped"] for i in items) == 2


def test_training_stream_survives_corruption_and_stops_on_an_all_bad_source(corrupt_shard: Path, tmp_path: Path) -> None:
    dm = module(corrupt_shard)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 25))  # 100 samples: the shard read ~12 times
    assert sum(int(b["skipped"].sum()) for b in batches) >= 6 * 10
    bad = write_tar(tmp_path / "bad.tar", members_of(face_sample("s", "b", None, 0), jpg=b"broken"))
    with pytest.raises(ValueError, match="data source 'a': 50 unusable samples in a row"):
        next(iter(module(bad, max_bad_run=50).train_dataloader()))


@pytest.mark.parametrize("n_shards", [6, 1], ids=["shard-split", "sample-split"])
def test_two_ranks_two_workers_cover_everything_once(tmp_path: Path, n_shards: int, monkeypatch) -> None:
    bad = members_of(face_sample("s", "bad", None, 0), jpg=b"broken")
    shards = [write_tar(tmp_path / f"{i}.tar", good_members(5, start=10 * i) + (bad if i == 0 else []))
              for i in range(n_shards)]
    everything = {f"s/p{10 * i + j}/img{10 * i + j}/000000" for i in range(n_shards) for j in range(5)}
    seen, skipped = [], 0
    for rank in (0, 1):
        if rank == 0:  # explicit rank info ...
            keys, bad = one_pass(module(shards), num_workers=2, rank=0, world=2)
        else:  # ... or the environment, as torchrun sets it
            monkeypatch.setenv("RANK", "1")
            monkeypatch.setenv("WORLD_SIZE", "2")
            keys, bad = one_pass(module(shards), num_workers=2)
        seen += keys
        skipped += bad
    assert len(seen) == len(set(seen)) and set(seen) == everything
    assert skipped == 1


def test_cached_latents_are_used_required_or_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lat = np.ones((4, SIZE // 8, SIZE // 8), np.float32)
    with_latents = write_tar(tmp_path / "lat.tar", members_of(face_sample("s", "a", None, 0, latents=lat))
                             + members_of(face_sample("s", "b", None, 1, latents=np.ones((4, 3, 3), np.float32))))
    without = good_shard(tmp_path / "plain.tar", 2)
    batch = module(with_latents).preview(4)
    assert batch["latents"].shape == (1, 4, 2, 2) and batch["skipped"].sum() == 1  # the 3x3 latents are wrong
    assert "latents" not in module(with_latents, use_latents=False).preview(4)
    keys, _ = one_pass(module(without, use_latents=True))
    assert keys == []  # with no sample to carry it, the count can only be logged:
    assert "skipped 2 unusable samples (missing 2); no usable sample in this worker" in caplog.text


def test_batches_hold_the_documented_fields(tmp_path: Path) -> None:
    batch = module(good_shard(tmp_path / "a.tar", 4)).preview(4)
    assert batch["pixel_values"].shape == (4, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.float32
    assert -1.0 <= float(batch["pixel_values"].min()) and float(batch["pixel_values"].max()) <= 1.0
    assert batch["id"].shape == (4, 512) and batch["exp"].shape == (4, EXP_DIM) and len(batch["key"]) == 4


def test_sources_are_mixed_by_weight(tmp_path: Path) -> None:
    a, b = good_shard(tmp_path / "a.tar", 4, source="a"), good_shard(tmp_path / "b.tar", 4, source="b")
    dm = FaceDataModule({"a": {"shards": str(a), "weight": 0.8}, "b": {"shards": str(b), "weight": 0.2}},
                        image_size=SIZE, batch_size=50, shuffle_buffer=0)
    keys = [k for batch in itertools.islice(iter(dm.train_dataloader()), 8) for k in batch["key"]]
    share = sum(k.startswith("a/") for k in keys) / len(keys)
    assert 0.72 < share < 0.88
