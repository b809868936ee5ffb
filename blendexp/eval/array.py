"""Evaluations as array jobs: ``array.size=N array.index=i`` generates and scores part i of the images,
``array.index=merge`` computes every metric, interval and table from the union.

Each method's images are cut into N contiguous runs at multiples of the scoring batch, so every part makes and
scores exactly the batches one process would: the merge's numbers (FID/KID from the stored per-image features, every
mean and interval) equal a single-process evaluation of the same generations. A part stores its per-image rows,
target and read FLAME vectors and FID features under ``<run>/array/part-<i>-of-<N>/`` with a summary of what it did
(``done.json``, written last) or its error (``failed.json``); generations go to the shared cache as always, so a killed
part resumes from its images on disk.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from blendexp.data.array import check_index, failure, recording_failure
from blendexp.eval.suite import Plan, Scores, Share, SuiteResult, input_keys, run_share, summarise_suite
from blendexp.results import write_atomic

log = logging.getLogger(__name__)
def part_dir(run_dir: Path, share: Share) -> Path:
    """Where part ``share.index`` keeps its scores and state."""
    return run_dir / "array" / f"part-{share.index:04d}-of-{share.size:04d}"


def save_part(plan: Plan, run_dir: Path, share: Share) -> dict[str, Any]:
    """Generate and score one part; store its scores, then ``done.json`` (or ``failed.json`` with the error)."""
    folder = part_dir(run_dir, share)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").unlink(missing_ok=True)
    start = time.perf_counter()
    with recording_failure(folder):
        scores, done = run_share(plan, share)
    for method, (rows, readings, feats) in scores.items():
        write_atomic(folder / f"{method}.rows.json", json.dumps(rows))
        with (folder / f"{method}.npz").open("wb") as f:
            np.savez(f, expression=readings, features=feats.numpy())
    summary = {"part": share.index, "size": share.size, "fingerprint": plan.fingerprint(), "methods": done,
               "elapsed_s": round(time.perf_counter() - start, 1)}
    write_atomic(folder / "done.json", json.dumps(summary, indent=1))
    return summary


def part_state(run_dir: Path, share: Share, fingerprint: str) -> str | None:
    """None when the part finished on these inputs and settings, else what is wrong with it."""
    folder = part_dir(run_dir, share)
    if (folder / "done.json").is_file():
        if json.loads((folder / "done.json").read_text())["fingerprint"] == fingerprint:
            return None
        return "made from other inputs or settings than these (re-run it)"
    return failure(folder) or "not finished (never started, or killed: re-run it to resume from its images on disk)"


def load_part(plan: Plan, run_dir: Path, share: Share) -> Scores:
    """A finished part's rows, FLAME readings and features per method."""
    folder, scores = part_dir(run_dir, share), {}
    for m in plan.methods:
        with np.load(folder / f"{m.name}.npz") as data:
            readings, feats = data["expression"], torch.from_numpy(data["features"])
        scores[m.name] = (json.loads((folder / f"{m.name}.rows.json").read_text()), readings, feats)
    return scores


def join(plan: Plan, parts: list[Scores]) -> Scores:
    """The parts' scores of every method in part order: the order of one process's run."""
    out: Scores = {}
    for m in plan.methods:
        rows = [r for p in parts for r in p[m.name][0]]
        readings = np.concatenate([p[m.name][1] for p in parts])
        feats = [p[m.name][2] for p in parts if len(p[m.name][2])]
        out[m.name] = (rows, readings, torch.cat(feats) if feats else torch.zeros(0))
    return out


def record_inputs(plan: Plan) -> None:
    """The shared cache record (``inputs.json``) of every generating method, as one process would leave it."""
    for folder in plan.folders.values():
        if folder.is_dir():
            write_atomic(folder / "inputs.json", json.dumps(input_keys(plan.test), indent=1, sort_keys=True))


def merge(plan: Plan, run_dir: Path, size: int, allow_partial: bool) -> SuiteResult:
    """Every metric from the finished parts; incomplete parts are named, and refused unless ``allow_partial``
    (then the report's first lines say which parts are missing)."""
    shares = [Share(i, size) for i in range(size)]
    fingerprint = plan.fingerprint()
    missing = {s.index: state for s in shares if (state := part_state(run_dir, s, fingerprint))}
    if missing and not allow_partial:
        lines = "; ".join(f"part {i} ({part_dir(run_dir, shares[i])}): {state}" for i, state in missing.items())
        raise ValueError(f"{len(missing)} of {size} parts are incomplete: {lines}. Re-run them with array.index=<i>, "
                         "or report what is there with array.allow_partial=true")
    done = [s for s in shares if s.index not in missing]
    for s in done:
        info = json.loads((part_dir(run_dir, s) / "done.json").read_text())
        log.info("part %d of %d: %s in %.0f s", s.index, size, info["methods"], info["elapsed_s"])
    if missing:
        plan.test.warnings.append(f"partial array merge: {len(missing)} of {size} parts missing "
                                  f"({'; '.join(f'part {i}: {state}' for i, state in missing.items())})")
        log.warning(plan.test.warnings[-1])
    else:
        record_inputs(plan)
    return summarise_suite(plan, join(plan, [load_part(plan, run_dir, s) for s in done]))


def run_array(plan: Plan, run_dir: Path, array: Mapping[str, Any]) -> SuiteResult | dict[str, Any]:
    """One part (its summary), the merge, or every part in turn and then the merge."""
    size, index = check_index(array)
    if isinstance(index, int):
        return save_part(plan, run_dir, Share(index, size))
    if index is None:
        for i in range(size):
            save_part(plan, run_dir, Share(i, size))
    return merge(plan, run_dir, size, bool(array.get("allow_partial")))
