"""Loading shards for training: several sources mixed by weight, endless resampling for training and one
exact pass for evaluation, optional (reference, target) pairs, corrupt members skipped and counted exactly.

Each source is one stream: shard URLs (resampled forever from each consumer's own share of the shards when
there are enough, or split once across DDP ranks and loader workers) → tar members grouped by key →
``decode_sample`` → optional pairing (``pairs.py``) → shuffle buffer → tensors. Every unusable thing counts exactly once in the batch field ``skipped``:
a sample whose members are missing, undecodable or of the wrong shape, and a tar that cannot be
opened or is cut off. A cut-off tar's tail is one count: the sample being read when it ended (which
may have lost a trailing optional member such as ``latents.npy``) and everything after it.

Every checkpoint holds the training stream's position (``state_dict``); a resumed run replays the streams to it
(``replay.py``), so it sees the same batches as an uninterrupted one.

There is no horizontal flip: FLAME's expression coefficients have no known mirror mapping (see pairs.py).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from blendexp.data.format import CorruptSample, FaceSample, decode_sample
from blendexp.data.pairs import PairConfig, PairSampler
from blendexp.data.replay import Replay, StreamPosition

log = logging.getLogger(__name__)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://")
REF_FIELDS = {"pixel_values": "ref_pixel_values", "id": "ref_id", "exp": "ref_exp", "key": "ref_key",
              "latents": "ref_latents"}


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


def _cut_short(tar: tarfile.TarFile) -> bool:
    """True when the stream ended without tar's end-of-archive block: tarfile stops silently on a cut header."""
    return getattr(tar.fileobj, "pos", tar.offset + tarfile.BLOCKSIZE) < tar.offset + tarfile.BLOCKSIZE


def _close_quietly(stream: Any) -> None:
    """Close a shard stream on early exit (a stopped reader); a pipe's exit status no longer matters then."""
    try:
        if stream is not None:
            stream.close()
    except Exception:  # noqa: BLE001 - e.g. a pipe command killed by SIGPIPE after we stopped reading
        pass


def tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Each file member's name and bytes, without the tar headers: the same samples compare equal however their
    shards were grouped or when they were written (headers carry the write time)."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()  # type: ignore[union-attr]


def read_tars(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Member groups (``__key__``, ``__url__``, ext → bytes) in tar order; a tar that cannot be opened or read to
    its end yields one ``__error__`` item instead of raising, and its half-read last group is dropped."""
    for url in urls:
        group: dict[str, Any] | None = None
        stream, done = None, 0
        try:
            stream = wds.gopen(url, "rb")
            tar = tarfile.open(fileobj=stream, mode="r|*")
            for info in tar:
                if not info.isfile():
                    continue
                prefix, ext = wds.tariterators.base_plus_ext(info.name)
                prefix, ext = (prefix, ext) if prefix is not None else (info.name, "")
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                if group is not None and group["__key__"] != prefix:
                    yield group
                    group, done = None, done + 1
                group = group or {"__key__": prefix, "__url__": url}
                group[ext] = data
            if _cut_short(tar):
                raise tarfile.ReadError("archive ends without its end-of-archive block (truncated)")
            stream.close()  # a pipe: command reports its exit status here
        except Exception as err:  # noqa: BLE001 - any read failure is one unreadable tail, counted downstream
            yield {"__error__": f"{url}: unreadable after {done} complete samples: {err}",
                   "__url__": url}
            continue
        finally:
            _close_quietly(stream)
        if group is not None:
            yield group


def to_tensors(sample: FaceSample) -> dict[str, Any]:
    """The batch fields of one sample: pixels (3, H, W) in [-1, 1], id (512,), exp (55,), optional latents."""
    image = sample.image if sample.image.flags.writeable else np.array(sample.image)  # torch wants writable memory
    pixels = torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    out: dict[str, Any] = {"pixel_values": pixels, "id": torch.from_numpy(sample.id_emb),
                           "exp": torch.from_numpy(sample.exp), "key": sample.key}
    if sample.latents is not None:
        out["latents"] = torch.from_numpy(sample.latents)
    return out


def pair_tensors(target: FaceSample, ref: FaceSample) -> dict[str, Any]:
    """Target fields plus ``ref_pixel_values`` (3, H, W), ``ref_id`` (512,), ``ref_exp`` (55,), ``ref_key``
    [, ``ref_latents``]: the names the Reference Adapter module reads."""
    out = to_tensors(target)
    out.update({REF_FIELDS[k]: v for k, v in to_tensors(ref).items()})
    return out


def _shard_names(urls: Iterable[str], limit: int = 5) -> str:
    """Shard URLs for a one-line message: the first ``limit`` and how many more."""
    names = sorted(set(urls))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _reason_counts(reasons: Counter[str]) -> str:
    """``shape 3, norm 2``: skipped samples per reason, most frequent first."""
    return ", ".join(f"{reason} {n}" for reason, n in reasons.most_common())


class SkipCounter:
    """Counts unusable members of one source in one worker by reason and hands the count to the next emitted item;
    warnings are summaries (after 1, 10, 100, ... skips and at the end of a pass), not one line per member."""

    def __init__(self, source: str, max_bad_run: int | None = None) -> None:
        """``max_bad_run``: raise after this many unusable samples in a row (endless streams only)."""
        self.source, self.max_bad_run = source, max_bad_run
        self.pending = 0
        self.reasons: Counter[str] = Counter()
        self.next_report = 1

    def _skip(self, err: CorruptSample) -> None:
        """Count one unusable sample and log a summary when the total reaches the next power of ten."""
        self.pending += 1
        self.reasons[err.reason] += 1
        if self.reasons.total() >= self.next_report:
            self.next_report *= 10
            self.report(f"latest: {err}")

    def report(self, detail: str = "") -> None:
        """One warning with the skipped samples per reason so far."""
        log.warning("data source %s: skipped %d unusable samples (%s)%s", self.source, self.reasons.total(),
                    _reason_counts(self.reasons), f"; {detail}" if detail else "")

    def decode(self, items: Iterable[dict[str, Any]], image_size: int, use_latents: bool | None
               ) -> Iterator[tuple[str, FaceSample]]:
        """(shard url, sample) for every usable group; each error item or corrupt group counts once."""
        bad_urls: list[str] = []
        bad_reasons: Counter[str] = Counter()
        for raw in items:
            try:
                if "__error__" in raw:
                    raise CorruptSample(raw["__error__"], "unreadable")
                sample = decode_sample(raw, image_size)
                check_sample(sample, image_size, use_latents)
            except CorruptSample as err:
                self._skip(err)
                bad_urls.append(raw["__url__"])
                bad_reasons[err.reason] += 1
                if self.max_bad_run and len(bad_urls) >= self.max_bad_run:
                    raise ValueError(f"data source {self.source!r}: {len(bad_urls)} unusable samples in a row "
                                     f"({_reason_counts(bad_reasons)}) from {_shard_names(bad_urls)}; last: {err}; "
                                     f"check these shards and data.image_size / data.use_latents") from None
                continue
            bad_urls, bad_reasons = [], Counter()
            yield raw["__url__"], sample

    def emit(self, items: Iterable[FaceSample | tuple[FaceSample, FaceSample]]) -> Iterator[dict[str, Any]]:
        """Tensors with ``skipped``; one item is held back so skips after the last sample still reach a batch."""
        held: dict[str, Any] | None = None
        for item in items:
            out = pair_tensors(*item) if isinstance(item, tuple) else to_tensors(item)
            if held is not None:
                held["skipped"], self.pending = self.pending, 0
                yield held
            held = out
        if held is not None:
            held["skipped"], self.pending = self.pending, 0
            yield held
        elif self.pending:
            self.report("no usable sample in this worker")
            return
        if self.reasons:
            self.report("end of pass")


def check_sample(sample: FaceSample, image_size: int, use_latents: bool | None) -> None:
    """Enforce what the batch needs beyond the contract: latents matching ``image_size``."""
    if use_latents is False:
        sample.latents = None
    elif sample.latents is None and use_latents:
        raise CorruptSample(f"{sample.key}: no latents.npy but data.use_latents=true", "missing")
    elif sample.latents is not None and (sample.latents.ndim != 3
                                         or sample.latents.shape[1:] != (image_size // 8,) * 2):
        raise CorruptSample(f"{sample.key}: latents.npy has shape {sample.latents.shape}; data.image_size="
                            f"{image_size} needs (C, {image_size // 8}, {image_size // 8})", "shape")


def shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Bounded shuffle buffer: each new item swaps with a random held one once the buffer is full."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class FaceStream(IterableDataset):
    """One source's samples: resampled forever (training) or one exact pass split across ranks and workers."""

    def __init__(self, urls: list[str], source: str, image_size: int, *, endless: bool, shuffle: int = 0,
                 seed: int = 0, pairs: PairConfig | None = None, use_latents: bool | None = None,
                 rank: int | None = None, world_size: int | None = None, max_bad_run: int = 1000,
                 epoch: int = 0) -> None:
        """Keep the settings; everything per worker (seeds, splits, counters) is made in ``__iter__``. ``epoch``:
        the first pass's epoch number (a resumed run continues the epoch it was in)."""
        super().__init__()
        self.urls, self.source, self.image_size, self.endless = list(urls), source, image_size, endless
        self.shuffle, self.seed, self.pairs, self.use_latents = shuffle, seed, pairs, use_latents
        self.rank, self.world_size, self.max_bad_run = rank, world_size, max_bad_run
        self.epoch = epoch - 1
        self.worker_shift = 0  # set by ``Replay``: this loader worker continues another worker's stream

    def consumer(self) -> tuple[int, int, int]:
        """(this consumer's index, number of consumers, rank): DDP ranks x loader workers, explicit rank first."""
        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        worker = (worker + self.worker_shift) % workers
        if self.rank is not None:
            rank, world = self.rank, self.world_size or 1
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        return rank * workers + worker, world * workers, rank

    def raw_items(self, index: int, count: int, rng: random.Random) -> Iterator[dict[str, Any]]:
        """Training: shards drawn at random forever, from this consumer's own share when there are at least as many
        shards as consumers (so DDP ranks and workers see disjoint samples), else from all of them. Evaluation: whole
        shards per consumer when there are enough, else every consumer reads all shards and keeps every
        ``count``-th group (error items included)."""
        split = len(self.urls) >= count
        own = self.urls[index::count] if split else self.urls
        if self.endless:
            return read_tars(rng.choice(own) for _ in itertools.count())
        if split:
            return read_tars(own)
        return itertools.islice(read_tars(self.urls), index, None, count)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Build this worker's pipeline with seeds derived from (seed, rank, worker, epoch)."""
        self.epoch += 1
        index, count, _ = self.consumer()
        seed = int(np.random.SeedSequence([self.seed, index, count, self.epoch]).generate_state(1)[0])
        rng = random.Random(seed)
        counter = SkipCounter(self.source, self.max_bad_run if self.endless else None)
        decoded = counter.decode(self.raw_items(index, count, rng), self.image_size, self.use_latents)
        stream: Iterable[Any] = (PairSampler(self.pairs, seed, self.endless, self.source)(decoded) if self.pairs
                                 else (sample for _, sample in decoded))
        if self.shuffle > 1:
            stream = shuffled(stream, self.shuffle, rng)
        return counter.emit(stream)


class WeightedMix(IterableDataset):
    """Endless mix of endless streams, each drawn with probability proportional to its weight."""

    def __init__(self, streams: list[FaceStream], weights: list[float], seed: int) -> None:
        """Check the weights early: a negative or all-zero mix is a config error."""
        super().__init__()
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data.sources weights must be >= 0 with a positive sum, got {weights}")
        self.streams, self.weights, self.seed = streams, weights, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Draw the next source at random for every sample (seeded per worker)."""
        index, count, _ = self.streams[0].consumer()
        rng = random.Random(int(np.random.SeedSequence([self.seed, index, count, 7]).generate_state(1)[0]))
        its = [iter(s) for s in self.streams]
        while True:
            yield next(rng.choices(its, weights=self.weights)[0])


class FaceDataModule(L.LightningDataModule):
    """Shards → batches of (pixels, id, exp[, latents][, ref_*]); sources mixed by their configured weights."""

    def __init__(self, sources: Mapping[str, Mapping[str, Any]], val_shards: str | list[str] | None = None,
                 image_size: int = 64, batch_size: int = 8, num_workers: int = 0, shuffle_buffer: int = 256,
                 seed: int = 0, pairs: Mapping[str, Any] | bool | None = None, use_latents: bool | None = None,
                 max_bad_run: int = 1000) -> None:
        """``pairs``: see ``PairConfig`` (None = off). ``use_latents``: None uses cached latents when present,
        True requires them, False ignores them. ``max_bad_run``: training stops after this many unusable samples
        in a row from one source (an all-corrupt source would otherwise loop forever)."""
        super().__init__()
        if not sources:
            raise ValueError("data.sources is empty; configure at least one source with `shards` and `weight`")
        self.sources = {name: dict(src) for name, src in sources.items()}
        self.val_shards, self.image_size = val_shards, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.pairs, self.use_latents, self.max_bad_run = PairConfig.from_config(pairs), use_latents, max_bad_run
        self.position = StreamPosition(workers=num_workers)  # where training starts; a checkpoint moves it

    def _stream(self, urls: list[str], name: str, *, endless: bool, shuffle: int, seed: int,
                rank: int | None = None, world_size: int | None = None, epoch: int = 0) -> FaceStream:
        """A ``FaceStream`` with this module's decoding, pairing and latent settings."""
        return FaceStream(urls, name, self.image_size, endless=endless, shuffle=shuffle, seed=seed, pairs=self.pairs,
                          use_latents=self.use_latents, rank=rank, world_size=world_size, max_bad_run=self.max_bad_run,
                          epoch=epoch)

    def train_dataset(self) -> IterableDataset:
        """Endless mix of all sources with probabilities proportional to their weights, from ``self.position``."""
        streams, weights = [], []
        for i, (name, src) in enumerate(self.sources.items()):
            urls = expand_shards(src["shards"], f"data.sources.{name}.shards")
            streams.append(self._stream(urls, name, endless=True, shuffle=self.shuffle_buffer, seed=self.seed + i,
                                        epoch=self.position.epoch))
            weights.append(float(src.get("weight", 1.0)))
        mix = streams[0] if len(streams) == 1 else WeightedMix(streams, weights, self.seed)
        return Replay(mix, self.position, self.batch_size)

    def stream_settings(self) -> dict[str, Any]:
        """Everything that decides the training stream's content and order; a replay needs all of it unchanged."""
        sources = {name: [expand_shards(src["shards"]), float(src.get("weight", 1.0))]
                   for name, src in self.sources.items()}
        return {"sources": hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:16],
                "pairs": dataclasses.asdict(self.pairs) if self.pairs else None, "seed": self.seed,
                "batch_size": self.batch_size, "num_workers": self.num_workers, "shuffle_buffer": self.shuffle_buffer,
                "image_size": self.image_size, "use_latents": self.use_latents, "max_bad_run": self.max_bad_run,
                "world_size": self.trainer.world_size if self.trainer else 1}

    def state_dict(self) -> dict[str, Any]:
        """The training stream's position, which Lightning writes into every checkpoint (exact resume)."""
        return {"epoch": self.trainer.current_epoch, "stream": self.stream_settings(),
                "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream where the checkpoint left it; with changed stream settings start afresh, loudly."""
        now = self.stream_settings()
        changed = sorted(k for k in now.keys() | state["stream"].keys() if now.get(k) != state["stream"].get(k))
        if changed:
            log.warning("data settings %s differ from the checkpoint's: the training stream starts from its "
                        "beginning, so this run will not equal an uninterrupted one", ", ".join(changed))
            return
        self.position = StreamPosition(state["epoch"], state["batches"], self.num_workers)

    def eval_dataset(self, rank: int | None = None, world_size: int | None = None) -> FaceStream:
        """One exact pass over the evaluation shards, disjoint across DDP ranks and loader workers.

        Rank and world size come from the arguments, else from RANK/WORLD_SIZE or torch.distributed."""
        if self.val_shards is None:
            raise ValueError("data.val_shards is not set; it is needed for previews and evaluation")
        urls = expand_shards(self.val_shards, "data.val_shards")
        return self._stream(urls, "val", endless=False, shuffle=0, seed=self.seed, rank=rank, world_size=world_size)

    def setup(self, stage: str | None = None) -> None:
        """Check every configured shard path up front so a typo fails before any model is loaded."""
        for name, src in self.sources.items():
            expand_shards(src["shards"], f"data.sources.{name}.shards")
        if self.val_shards is not None:
            expand_shards(self.val_shards, "data.val_shards")

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        """A DataLoader over an iterable dataset (batching happens here, per worker)."""
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Endless training batches."""
        return self._loader(self.train_dataset())

    def eval_dataloader(self, rank: int | None = None, world_size: int | None = None) -> DataLoader:
        """Batches of one exact evaluation pass (this rank's share)."""
        return DataLoader(self.eval_dataset(rank, world_size), batch_size=self.batch_size,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def preview(self, n: int) -> dict[str, Any]:
        """The first ``n`` evaluation samples as one batch, identical on every rank: fixed sample-grid conditions."""
        items = list(itertools.islice(iter(self.eval_dataset(rank=0, world_size=1)), n))
        if not items:
            raise ValueError(f"data.val_shards {self.val_shards} holds no usable samples")
        return torch.utils.data.default_collate(items)
