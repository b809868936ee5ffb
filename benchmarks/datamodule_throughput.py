"""The FaceDataModule's training stream against raw webdataset decoding of the same shards, in samples/s.

    python benchmarks/datamodule_throughput.py [--shards 'data/sample/train-{000000..000003}.tar'] [--samples 3000]
                                               [--repeats 3] [--check] [--quick]

The DataModule side is ``train_dataloader()`` as training uses it: the shards split into two sources mixed by
weight, endless resampling, the shuffle buffer, (reference, target) pairs of stills of one subject, validation and
skip counting, collation. The raw side decodes the same shards with webdataset (image, id, exp and the json metadata
that pairing reads; tensors, batched) and nothing more. Both run in this process (``num_workers=0``) and are timed over ``--samples`` samples after their
first batch (which fills the buffers once per run); the pair stage groups a shard before it emits, so the training
stream decodes up to a shard per source ahead of what it yields, and the window spans many shards to keep that
read-ahead from counting as a cost (600 samples measured 0.68x from it alone). A pair counts as one sample, since each decoded frame becomes one
training target. Runs alternate; the fastest of each side counts.
Figure: DataModule samples/s over webdataset's (goal in goals.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from blendexp.config import REPO_ROOT
from blendexp.data.datamodule import FaceDataModule, expand_shards
from goals import Round, alternating, check_args, standalone

NAME = "datamodule_throughput"
QUICK = ["--samples", "200"]


def to_batch_fields(sample: tuple) -> dict:
    """What the DataModule yields per sample, from webdataset's decoded tuple."""
    image, id_emb, exp, _meta = sample
    pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0
    return {"pixel_values": pixels, "id": torch.from_numpy(id_emb), "exp": torch.from_numpy(exp)}


def samples_per_s(loader: DataLoader, samples: int, batch: int) -> float:
    """Steady-state samples per second: ``samples`` (whole batches) after the first batch, which fills the shuffle
    and pair buffers once per run; both sides repeat their shards endlessly."""
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    n = sum(len(b["id"]) for b in itertools.islice(batches, -(-samples // batch)))
    return n / (time.perf_counter() - start)


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = check_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--shards", default=str(REPO_ROOT / "data/sample/train-{000000..000003}.tar"))
    p.add_argument("--samples", type=int, default=3000,
                   help="samples timed per run: many shards' worth, since the pair stage reads a whole shard ahead")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    return p


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> Any:
    """Both pipelines over the same shards; one round times each once."""
    urls = expand_shards(args.shards)
    half = max(1, len(urls) // 2)
    raw = (wds.WebDataset(urls, shardshuffle=False, empty_check=False, repeat=True).decode("rgb8")
           .to_tuple("jpg", "id.npy", "exp.npy", "json").map(to_batch_fields))
    dm = FaceDataModule({"a": {"shards": urls[:half], "weight": 0.5}, "b": {"shards": urls[half:] or urls,
                                                                            "weight": 0.5}},
                        image_size=args.image_size, batch_size=args.batch, num_workers=0, shuffle_buffer=256,
                        pairs={"stills": True})

    return alternating({"raw": lambda: samples_per_s(DataLoader(raw, batch_size=args.batch), args.samples, args.batch),
                        "datamodule": lambda: samples_per_s(dm.train_dataloader(), args.samples, args.batch)})


def figure(rounds: list[Round]) -> tuple[float, str]:
    """Fastest DataModule throughput over fastest raw throughput."""
    raw, dm = max(r["raw"] for r in rounds), max(r["datamodule"] for r in rounds)
    return dm / raw, f"webdataset {raw:.0f} samples/s, DataModule training stream {dm:.0f} samples/s"


if __name__ == "__main__":
    standalone(__import__(__name__))
