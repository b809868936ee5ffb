"""Exact resume of the endless training stream by deterministic replay.

Every consumer's stream (DDP rank x loader worker) is a pure function of its seeds (``FaceStream`` derives them from
``(seed, consumer, epoch)``), so the state after N batches (shard draws, shuffle buffer, pair buffer, mix draws) is
rebuilt exactly by running the same streams again and dropping what was already trained on, instead of pickling
live generators. A DataLoader asks its workers in turn (batch i comes from worker i mod W) and a fresh loader starts
at worker 0, so on resume worker p plays worker (p + N) mod W of the first run and skips that worker's share of the
N batches. The replay re-reads and decodes those N x batch_size samples per rank (no model work): a second or two
for the toy runs, minutes for a long run on full-size images - the price of a bit-identical continuation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info


@dataclass(frozen=True)
class StreamPosition:
    """How far one rank's training stream had been consumed when a checkpoint was written."""

    epoch: int = 0  # Lightning's epoch (the endless stream stays in epoch 0 unless limit_train_batches is set)
    batches: int = 0  # batches of that epoch already trained on (the same on every rank)
    workers: int = 0  # DataLoader workers then (0: read in the main process)

    def logical_worker(self, physical: int) -> int:
        """Which worker of the first run the ``physical`` worker of the resumed loader continues."""
        return (physical + self.batches) % max(self.workers, 1)

    def batches_of(self, worker: int) -> int:
        """How many of the first ``batches`` batches that worker produced (batch i came from worker i mod W)."""
        workers = max(self.workers, 1)
        return max(0, (self.batches - worker + workers - 1) // workers)


class Replay(IterableDataset):
    """Wraps the training stream; its first pass starts where ``position`` left off, later passes (epochs) as usual."""

    def __init__(self, dataset: IterableDataset, position: StreamPosition, batch_size: int) -> None:
        """``dataset``: a ``FaceStream`` or ``WeightedMix`` built for ``position.epoch``."""
        super().__init__()
        self.dataset, self.position, self.batch_size = dataset, position, batch_size

    def __iter__(self) -> Iterator[Any]:
        """This worker's stream with its share of the trained batches dropped (each worker holds its own copy)."""
        position, self.position = self.position, StreamPosition(workers=self.position.workers)
        info = get_worker_info()
        physical = info.id if info is not None else 0
        worker = position.logical_worker(physical)
        for stream in getattr(self.dataset, "streams", [self.dataset]):
            stream.worker_shift = worker - physical
        return itertools.islice(iter(self.dataset), position.batches_of(worker) * self.batch_size, None)
