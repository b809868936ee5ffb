"""Shard building with 2 worker processes against 1, on the same toy-world stills and clips.

    python benchmarks/build_workers.py [--workers 2] [--subjects 6]

A first build renders the toy-world inputs and tiny random annotators into a temporary folder; then
``blendexp.data.build.build`` is timed end to end (planning, worker start-up, model loading, annotation, packing)
with 1 worker and with ``--workers`` workers, alternating, fastest of ``--repeats``. Prints the wall-clock
speed-up (goal: >= 1.7 with 2 workers on 2 free cores), checks that both builds wrote identical shards, and
prints the workers' CPU seconds: on a machine shared with other jobs the wall-clock ratio only shows the CPU
share this job got, while ``workers x CPU(1) / CPU(N)`` bounds the speed-up the same build reaches on free cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from blendexp.config import CONF_DIR
from blendexp.data.build import build


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


def main() -> None:
    """Render inputs, time both settings, print the ratio."""
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--subjects", type=int, default=6, help="toy subjects per split (stills, videos)")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        timed_build(root, a.subjects, 0, -1)  # renders inputs, writes the tiny annotators, warms file caches
        one = many = cpu_one = cpu_many = float("inf")
        for run in range(a.repeats):
            t1, c1, shards1 = timed_build(root, a.subjects, 1, run)
            tn, cn, shards_n = timed_build(root, a.subjects, a.workers, run)
            assert shards1 == shards_n, "worker count changed the shards"
            one, many, cpu_one, cpu_many = min(one, t1), min(many, tn), min(cpu_one, c1), min(cpu_many, cn)
    print(f"1 worker: {one:.1f} s   {a.workers} workers: {many:.1f} s   speed-up: {one / many:.2f}x "
          f"(goal >= 1.7 for 2 workers; identical shards)\n"
          f"worker CPU: {cpu_one:.1f} s vs {cpu_many:.1f} s; "
          f"bound on free cores: {a.workers * cpu_one / cpu_many:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
