"""Loading shards for training: several sources mixed by weight, endless resampling for training and one
exact pass for evaluation, corrupt members skipped and counted (the count travels with each batch)."""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from blendexp.data.format import CorruptSample, FaceSample, decode_sample

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://")


def expand_shards(spec: str | list[str], what: str = "shards") -> list[str]:
    """Expand braces, globs and folders into shard URLs; fail with the pattern when nothing local exists."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in wds.shardlists.expand_urls(str(item)):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
            elif Path(url).is_dir():
                urls += sorted(glob.glob(str(Path(url) / "*.tar")))
            elif any(c in url for c in "*?["):
                urls += sorted(glob.glob(url))
            elif Path(url).is_file():
                urls.append(url)
            else:
                raise FileNotFoundError(f"{what}: shard {url} does not exist (from {item!r}); expected WebDataset "
                                        f".tar shards, e.g. built by `python -m blendexp.data.build`")
    if not urls:
        raise FileNotFoundError(f"{what}: no .tar shards found at {specs}; expected WebDataset .tar shards, e.g. "
                                f"built by `python -m blendexp.data.build`")
    return urls


class SkipCounter:
    """Counts unusable members in one worker and hands the count to the next sample that gets through."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.pending = 0

    def handler(self, exn: Exception) -> bool:
        """webdataset error handler: log, count and keep going (truncated tars, unreadable streams)."""
        self.pending += 1
        log.warning("skipping unreadable data in source %s: %s", self.source, exn)
        return True

    def decode(self, image_size: int) -> Any:
        """A map function decoding raw members to tensors, or ``None`` (counted) for a corrupt member."""

        def _decode(raw: dict[str, Any]) -> dict[str, Any] | None:
            try:
                sample = decode_sample(raw, image_size)
            except CorruptSample as err:
                self.pending += 1
                log.warning("skipping corrupt sample in source %s: %s", self.source, err)
                return None
            out = to_tensors(sample)
            out["skipped"], self.pending = self.pending, 0
            return out

        return _decode


def to_tensors(sample: FaceSample) -> dict[str, Any]:
    """The batch fields of one sample: pixels (3, H, W) in [-1, 1], id (512,), exp (55,), optional latents."""
    pixels = torch.from_numpy(np.array(sample.image, copy=True)).permute(2, 0, 1).float() / 127.5 - 1.0
    out: dict[str, Any] = {"pixel_values": pixels, "id": torch.from_numpy(sample.id_emb),
                           "exp": torch.from_numpy(sample.exp), "key": sample.key}
    if sample.latents is not None:
        out["latents"] = torch.from_numpy(sample.latents)
    return out


def shard_stream(urls: list[str], counter: SkipCounter, image_size: int, *, endless: bool, shuffle: int,
                 seed: int) -> wds.WebDataset:
    """One source's sample stream: resampled forever for training, split exactly by node/worker for evaluation."""
    if endless:
        ds = wds.WebDataset(urls, resampled=True, shardshuffle=False, handler=counter.handler, seed=seed,
                            empty_check=False)
    else:
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, handler=counter.handler,
                            empty_check=False)
    if shuffle > 0:
        ds = ds.shuffle(shuffle, seed=seed)
    return ds.map(counter.decode(image_size)).select(lambda s: s is not None)


class FaceDataModule(L.LightningDataModule):
    """Shards → batches of (pixels, id, exp[, latents]); sources mixed by their configured weights."""

    def __init__(self, sources: Mapping[str, Mapping[str, Any]], val_shards: str | list[str] | None = None,
                 image_size: int = 64, batch_size: int = 8, num_workers: int = 0, shuffle_buffer: int = 256,
                 seed: int = 0) -> None:
        super().__init__()
        if not sources:
            raise ValueError("data.sources is empty; configure at least one source with `shards` and `weight`")
        self.sources = {name: dict(src) for name, src in sources.items()}
        self.val_shards, self.image_size = val_shards, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed

    def train_dataset(self) -> torch.utils.data.IterableDataset:
        """Endless mix of all sources with probabilities proportional to their weights."""
        streams, weights = [], []
        for i, (name, src) in enumerate(self.sources.items()):
            urls = expand_shards(src["shards"], f"data.sources.{name}.shards")
            streams.append(shard_stream(urls, SkipCounter(name), self.image_size, endless=True,
                                        shuffle=self.shuffle_buffer, seed=self.seed + i))
            weights.append(float(src.get("weight", 1.0)))
        if len(streams) == 1:
            return streams[0]
        return wds.RandomMix(streams, probs=weights, longest=True)

    def eval_dataset(self) -> wds.WebDataset:
        """One exact pass over the evaluation shards, disjoint across DDP ranks and loader workers."""
        if self.val_shards is None:
            raise ValueError("data.val_shards is not set; it is needed for previews and evaluation")
        urls = expand_shards(self.val_shards, "data.val_shards")
        return shard_stream(urls, SkipCounter("val"), self.image_size, endless=False, shuffle=0, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        """Check every configured shard path up front so a typo fails before any model is loaded."""
        for name, src in self.sources.items():
            expand_shards(src["shards"], f"data.sources.{name}.shards")
        if self.val_shards is not None:
            expand_shards(self.val_shards, "data.val_shards")

    def _loader(self, dataset: torch.utils.data.IterableDataset) -> DataLoader:
        """A DataLoader over an iterable dataset (batching happens here, per worker)."""
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Endless training batches."""
        return self._loader(self.train_dataset())

    def preview(self, n: int) -> dict[str, Any]:
        """The first ``n`` evaluation samples as one batch: fixed conditions for sample grids."""
        items: list[dict[str, Any]] = []
        it: Iterator[dict[str, Any]] = iter(self.eval_dataset())
        for item in it:
            items.append(item)
            if len(items) == n:
                break
        if not items:
            raise ValueError(f"data.val_shards {self.val_shards} holds no usable samples")
        return torch.utils.data.default_collate(items)
