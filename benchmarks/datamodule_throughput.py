"""FaceDataModule samples/s against plain webdataset decoding of the same shards.

    python benchmarks/datamodule_throughput.py [--shards 'data/sample/train-{000000..000003}.tar'] [--epochs 5]

Both pipelines read the same shards once per epoch in this process and produce the same tensors (pixels in
[-1, 1], id, exp); the DataModule additionally validates every sample, counts corrupt members and holds one
item back for exact skip counts. Runs alternate so background load hits both alike; the fastest counts.
The printed ratio is DataModule samples/s over webdataset samples/s (goal: >= 0.9).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from blendexp.config import REPO_ROOT
from blendexp.data.datamodule import FaceDataModule, expand_shards


def to_batch_fields(sample: tuple) -> dict:
    """What the DataModule yields per sample, from webdataset's decoded tuple."""
    image, id_emb, exp = sample
    pixels = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0
    return {"pixel_values": pixels, "id": torch.from_numpy(id_emb), "exp": torch.from_numpy(exp)}


def samples_per_s(loader: DataLoader) -> float:
    """Samples per second for one full pass."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["id"])
    return n / (time.perf_counter() - start)


def main() -> None:
    """Time both pipelines and print the ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--shards", default=str(REPO_ROOT / "data/sample/train-{000000..000003}.tar"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)
    urls = expand_shards(a.shards)
    raw = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb8")
           .to_tuple("jpg", "id.npy", "exp.npy").map(to_batch_fields))
    dm = FaceDataModule({"x": {"shards": urls}}, val_shards=urls, image_size=64, batch_size=a.batch)
    best_raw = best_dm = 0.0
    for _ in range(a.epochs):
        best_raw = max(best_raw, samples_per_s(DataLoader(raw, batch_size=a.batch)))
        best_dm = max(best_dm, samples_per_s(dm.eval_dataloader()))
    print(f"webdataset: {best_raw:.0f} samples/s   FaceDataModule: {best_dm:.0f} samples/s   "
          f"ratio: {best_dm / best_raw:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
