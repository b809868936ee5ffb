"""Shard building with 2 worker processes against 1, on the same toy-world stills and clips.

    python benchmarks/build_workers.py [--workers 2] [--subjects 12] [--repeats 3] [--check] [--quick]

A first build renders the toy-world inputs and tiny random annotators into a temporary folder; then
``blendexp.data.build.build`` is timed end to end (planning, worker start-up, model loading, annotation, packing)
with 1 worker and with ``--workers`` workers, alternating, fastest of ``--repeats``. Figure: the wall-clock
speed-up (goal in goals.py, for 2 workers on 2 free cores); builds that wrote different shards fail. It also
prints the workers' CPU seconds: on a machine shared with other jobs the wall-clock ratio only shows the CPU
share this job got, while ``workers x CPU(1) / CPU(N)`` bounds the speed-up the same build reaches on free cores.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir

from blendexp.config import CONF_DIR
from blendexp.data.build import build
from goals import Round, check_args, standalone

NAME = "build_workers"
QUICK = ["--subjects", "2"]


def timed_build(root: Path, subjects: int, workers: int, run: int) -> tuple[float, float, dict[str, bytes]]:
    """Wall seconds and worker CPU seconds of one fresh build (inputs rendered after the first), and its shards."""
    out = root / f"out-{workers}-{run}"
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("build", overrides=[
            "data/build=toy", f"out={out}", f"toy.out={root}/toy", f"tiny_annotators={root}/annotators",
            f"toy.stills.subjects={subjects}", f"toy.videos.subjects={subjects}", f"num_workers={workers}",
            "images_per_task=4"])
    start, cpu = time.perf_counter(), os.times()
    build(cfg)
    end = os.times()
    cpu_s = end.children_user + end.children_system - cpu.children_user - cpu.children_system
    return time.perf_counter() - start, cpu_s, {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = check_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--subjects", type=int, default=12,
                   help="toy subjects per split (stills, videos): enough work that per-build start-up (models loaded "
                        "in each worker, pool start) weighs as little as in a real build")
    return p


def prepare(args: argparse.Namespace, stack: contextlib.ExitStack) -> Callable[[], Round]:
    """Render the inputs once; one round builds with 1 worker, then with ``--workers``, and compares the shards."""
    root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    timed_build(root, args.subjects, 0, -1)  # renders inputs, writes the tiny annotators, warms file caches
    runs = itertools.count()

    def one_round() -> Round:
        run = next(runs)
        t1, c1, shards1 = timed_build(root, args.subjects, 1, run)
        tn, cn, shards_n = timed_build(root, args.subjects, args.workers, run)
        return {"one": t1, "many": tn, "cpu_one": c1, "cpu_many": cn, "same": shards1 == shards_n,
                "workers": args.workers}

    return one_round


def figure(rounds: list[Round]) -> tuple[float, str, list[str]]:
    """Fastest 1-worker build over fastest N-worker build; different shards fail the benchmark."""
    one, many = min(r["one"] for r in rounds), min(r["many"] for r in rounds)
    cpu_one, cpu_many = min(r["cpu_one"] for r in rounds), min(r["cpu_many"] for r in rounds)
    workers = rounds[0]["workers"]
    unequal = [] if all(r["same"] for r in rounds) else ["build_workers: the worker count changed the shards"]
    return one / many, (f"1 worker {one:.1f} s, {workers} workers {many:.1f} s, identical shards; worker CPU "
                        f"{cpu_one:.1f} s vs {cpu_many:.1f} s (bound on free cores "
                        f"{workers * cpu_one / cpu_many:.2f}x)"), unequal


if __name__ == "__main__":
    standalone(__import__(__name__))
