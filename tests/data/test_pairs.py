"""(reference, target) pairs: gap and expression-distance limits, stills by subject, and the toy-world preset."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from blendexp.config import CONF_DIR
from blendexp.data.build import build
from blendexp.data.datamodule import FaceDataModule
from blendexp.data.format import FaceSample
from blendexp.data.pairs import PairConfig, PairSampler
from blendexp.flame import EXP_DIM
from tests.conftest import REPO
from tests.data.conftest import face_sample, members_of, write_tar


def clip_frames(subject: str, clip: str, n: int, step: float = 0.3) -> list[FaceSample]:
    """``n`` frames (every 2nd source frame) whose expression walks steadily: distance grows with the gap."""
    return [face_sample("v", subject, clip, 2 * i, exp=np.full(EXP_DIM, step * i, np.float32)) for i in range(n)]


def frame(sample: FaceSample) -> int:
    """Source-video frame index of a sample."""
    return int(sample.meta["frame"])


def test_pairs_respect_gap_distance_and_clip() -> None:
    # Frames are 2 source frames apart: the gap allows 2..4 steps, the distance only 3 or 4 (2.5 x one step).
    cfg = PairConfig(min_gap=4, max_gap=8, min_exp_dist=0.3 * 2.5 * np.sqrt(EXP_DIM), buffer=64)
    stream = [("u0", s) for s in clip_frames("a", "c0", 10) + clip_frames("a", "c1", 10) + clip_frames("b", "c0", 2)]
    pairs = list(PairSampler(cfg, seed=0, endless=False)(stream))
    assert len(pairs) == 20  # every frame of the two long clips has a partner; the 2-frame clip has none in range
    for target, ref in pairs:
        assert (target.subject, target.clip) == (ref.subject, ref.clip) and target.key != ref.key
        assert 6 <= abs(frame(target) - frame(ref)) <= 8
        assert np.linalg.norm(target.exp - ref.exp) >= cfg.min_exp_dist
    assert len({frame(r) for t, r in pairs if frame(t) == 8}) >= 1
    seen = {(t.key, r.key) for t, r in pairs}
    assert seen != {(t.key, r.key) for t, r in PairSampler(cfg, seed=1, endless=False)(stream)}  # seeded choice


def test_pairs_never_cross_shards_and_stills_pair_by_subject() -> None:
    stills = [face_sample("s", "p", None, i) for i in range(3)] + [face_sample("s", "q", None, 9)]
    stream = [("u0", stills[0]), ("u0", stills[1]), ("u1", stills[2]), ("u1", stills[3])]
    assert list(PairSampler(PairConfig(), seed=0, endless=False)(stream)) == []  # stills off by default
    pairs = list(PairSampler(PairConfig(stills=True), seed=0, endless=False)(stream))
    assert {(t.key, r.key) for t, r in pairs} == {(stills[0].key, stills[1].key), (stills[1].key, stills[0].key)}


def test_unpairable_training_source_fails_with_advice() -> None:
    stream = itertools.cycle([("u", face_sample("s", "p", None, i)) for i in range(3)])
    with pytest.raises(ValueError, match="Stills pair only with data.pairs.stills=true"):
        next(PairSampler(PairConfig(buffer=8, max_unpaired=50), seed=0, endless=True, source="s")(stream))


def test_bad_pair_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_gap <= max_gap"):
        PairConfig.from_config({"min_gap": 5, "max_gap": 2})
    with pytest.raises(ValueError, match="unknown keys \\['gap'\\]"):
        PairConfig.from_config({"gap": 5})
    assert PairConfig.from_config(None) is None and PairConfig.from_config({"enabled": False}) is None


def test_datamodule_batches_carry_reference_fields(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "v.tar", [m for s in clip_frames("a", "c0", 8) + clip_frames("b", "c0", 8)
                                           for m in members_of(s)])
    dm = FaceDataModule({"v": {"shards": str(shard)}}, image_size=16, batch_size=6,
                        pairs={"min_gap": 2, "max_gap": 6, "min_exp_dist": 1.0})
    batch = next(iter(dm.train_dataloader()))
    assert batch["ref_pixel_values"].shape == (6, 3, 16, 16) and batch["ref_id"].shape == (6, 512)
    assert batch["ref_exp"].shape == (6, EXP_DIM) and len(batch["ref_key"]) == 6
    for key, ref_key in zip(batch["key"], batch["ref_key"]):
        assert key.rsplit("/", 1)[0] == ref_key.rsplit("/", 1)[0] and 2 <= abs(
            int(key.rsplit("/", 1)[1]) - int(ref_key.rsplit("/", 1)[1])) <= 6
    assert (batch["ref_exp"] - batch["exp"]).norm(dim=1).min() >= 1.0


def test_toy_preset_builds_what_toy_video_data_reads(tmp_path: Path) -> None:
    small = ["toy.stills.subjects=2", "toy.stills.per_subject=3", "toy.videos.subjects=1", "toy.videos.clips=1",
             "toy.videos.frames=12", "toy.seed=1", "toy.val.subjects=1", "toy.val.per_subject=3", "toy.size=96", "num_workers=0",
             f"paths.cache={tmp_path}/cache", f"paths.data={tmp_path}/data",
             f"paths.toy_base={REPO}/data/toy"]  # outputs go to tmp; the shipped toy annotators stay the default
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        result = build(compose("build", overrides=["data/build=toy", *small]))
        data_cfg = compose("train", overrides=["+experiment=expr_adapter", "data=toy_video",
                                               f"paths.data={tmp_path}/data", "data.num_workers=0"]).data
    sources = result["manifest"]["sources"]
    assert set(sources) == {"stills", "videos", "val"} and sources["videos"]["clips"]
    assert result["manifest"]["toy_models"] == f"the toy world's ArcFace/SMIRK ({REPO / 'data' / 'toy'})"
    assert result["manifest"]["warnings"] == []  # toy renders read with toy models: nothing to warn about
    assert (tmp_path / "cache" / "toy-raw" / "videos" / "s0002" / "c00.mp4").is_file()
    dm = instantiate(data_cfg)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 64, 64) and batch["ref_pixel_values"].shape == (8, 3, 64, 64)
    assert {k.split("/")[0] for k in batch["key"]} <= {"stills", "videos"}
