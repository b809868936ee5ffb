"""(reference, target) pairs for the Reference Adapter: two frames of one clip, or two stills of one subject.

The Reference Adapter learns to copy appearance from a reference frame while the target's
expression comes from its FLAME vector, so a useful pair shows the same person (same clip, or
the same subject for stills) with a *different* expression: frames ``min_gap``..``max_gap``
apart in the source video and at least ``min_exp_dist`` apart in FLAME space (L2 over all 55
values).

Pairs are drawn from a bounded buffer of the decoded stream. This relies on the builder's
layout (``blendexp.data.build``): every frame of a clip sits in one shard, consecutively, and
stills of a subject are consecutive too. The buffer is emptied whenever a new shard starts or
it holds ``buffer`` samples, so pairs never cross shards and memory stays bounded.

No horizontal flip, on purpose: mirroring a face would need the mirrored FLAME vector, and
FLAME's 50 PCA expression coefficients have no known left/right permutation (only eyelids
and the sideways jaw could be mirrored exactly), so a flipped image would carry a wrong label.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from blendexp.data.format import FaceSample

log = logging.getLogger(__name__)
GroupKey = tuple[str, ...]


@dataclass(frozen=True)
class PairConfig:
    """Which (reference, target) pairs are allowed; every field is a config key under ``data.pairs``."""

    min_gap: int = 1  # smallest distance between the two frames, in source-video frames
    max_gap: int = 50  # largest distance, in source-video frames
    min_exp_dist: float = 0.0  # smallest L2 distance between the two (55,) FLAME vectors
    stills: bool = False  # also pair two different stills of the same subject
    buffer: int = 256  # samples held while grouping (memory bound; larger than a clip's frame count is best)
    max_unpaired: int = 5000  # training stops with an error after this many samples in a row without a pair

    def __post_init__(self) -> None:
        """Reject impossible limits at construction so a typo fails before training starts."""
        if not 0 <= self.min_gap <= self.max_gap:
            raise ValueError(f"data.pairs: need 0 <= min_gap <= max_gap, got min_gap={self.min_gap}, "
                             f"max_gap={self.max_gap}")
        if self.min_exp_dist < 0 or self.buffer < 2 or self.max_unpaired <= self.buffer:
            raise ValueError(f"data.pairs: need min_exp_dist >= 0, buffer >= 2 and max_unpaired > buffer, got {self}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | bool | None) -> PairConfig | None:
        """``None``/``False`` turns pairing off, ``True`` uses the defaults, a mapping sets the fields it names."""
        if cfg is None or cfg is False:
            return None
        if cfg is True:
            return cls()
        cfg = dict(cfg)
        if not cfg.pop("enabled", True):
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"data.pairs: unknown keys {unknown}; known keys are {sorted(known)} and 'enabled'")
        return cls(**cfg)


def group_key(sample: FaceSample, stills: bool) -> GroupKey | None:
    """Frames pair within their clip, stills within their subject (when enabled); ``None`` means unpairable."""
    source = str(sample.meta.get("source", sample.key.split("/")[0]))
    if sample.clip is not None:
        return source, sample.subject, str(sample.clip)
    return (source, sample.subject) if stills else None


def partner_mask(group: list[FaceSample], cfg: PairConfig) -> np.ndarray:
    """(N, N) bool: ``[t, r]`` is True when sample r may serve as the reference for target t."""
    exps = np.stack([s.exp for s in group])  # (N, 55)
    dist = np.linalg.norm(exps[:, None, :] - exps[None, :, :], axis=-1)
    ok = dist >= cfg.min_exp_dist
    if group[0].clip is not None:
        frames = np.array([int(s.meta.get("frame", 0)) for s in group])
        gap = np.abs(frames[:, None] - frames[None, :])
        ok &= (gap >= cfg.min_gap) & (gap <= cfg.max_gap)
    keys = np.array([s.key for s in group])
    return ok & (keys[:, None] != keys[None, :])  # never the same frame (also when a shard repeats a key)


class PairSampler:
    """Stream stage turning ``(shard url, sample)`` items into ``(target, reference)`` pairs."""

    def __init__(self, cfg: PairConfig, seed: int, endless: bool, source: str = "") -> None:
        """``endless``: a training stream, where a source that never pairs is an error rather than a count."""
        self.cfg, self.seed, self.endless, self.source = cfg, seed, endless, source
        self.unpaired = 0  # samples that found no partner (reported, never an error in a single pass)

    def _flush(self, groups: dict[GroupKey, list[FaceSample]], rng: random.Random
               ) -> Iterator[tuple[FaceSample, FaceSample]]:
        """Every sample of every buffered group becomes a target once, with a random allowed reference."""
        for group in groups.values():
            mask = partner_mask(group, self.cfg) if len(group) > 1 else np.zeros((1, 1), bool)
            for t, target in enumerate(group):
                refs = np.flatnonzero(mask[t])
                if len(refs) == 0:
                    self.unpaired += 1
                    continue
                yield target, group[int(refs[rng.randrange(len(refs))])]
        groups.clear()

    def __call__(self, items: Iterable[tuple[str, FaceSample]]) -> Iterator[tuple[FaceSample, FaceSample]]:
        """Group consecutive samples of one shard, emit their pairs, and fail loudly if a source never pairs."""
        rng = random.Random(self.seed)
        groups: dict[GroupKey, list[FaceSample]] = {}
        held, url, since_pair = 0, None, 0
        for item_url, sample in items:
            if item_url != url or held >= self.cfg.buffer:
                for pair in self._flush(groups, rng):
                    since_pair = 0
                    yield pair
                held, url = 0, item_url
            key = group_key(sample, self.cfg.stills)
            since_pair += 1
            if key is None:
                self.unpaired += 1
            else:
                groups.setdefault(key, []).append(sample)
                held += 1
            if self.endless and since_pair > self.cfg.max_unpaired:
                raise ValueError(
                    f"data source {self.source!r}: no (reference, target) pair in the last {since_pair} samples. "
                    "Stills pair only with data.pairs.stills=true; otherwise loosen data.pairs.min_gap/max_gap/"
                    "min_exp_dist, or check that the shards hold several frames per clip (built by "
                    "`python -m blendexp.data.build`)")
        yield from self._flush(groups, rng)
        if self.unpaired:
            log.info("source %s: %d samples found no pair partner", self.source, self.unpaired)
