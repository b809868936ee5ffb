"""Run every benchmark with a goal in one process and write one summary: figures, goals, pass/fail, machine.

    python benchmarks/run_all.py [--quick] [--repeats 3] [--out benchmarks/results] [--only NAME ...]

Every benchmark is prepared first (models built, inputs rendered, warm-ups done); then ``--repeats`` rounds run
them in a fixed order, each round timing each benchmark's reference and user path once, alternating, so background
load spreads over all of them alike; the fastest of each side counts. Writes ``<out>/<date>.json`` and
``<out>/<date>.md`` (``<date>-quick.*`` with ``--quick``, whose reduced sizes make a smoke run, not figures to
quote) and exits 1 when any goal is missed. ``BLENDEXP_BENCH_GOALS="name=value,..."`` overrides goals.
The toy-world closed loop (``closed_loop.py``, about 80 minutes on 2 CPU cores) is not part of this run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

import build_workers
import cached_latents
import datamodule_throughput
import generate_overhead
import reference_mode
import train_step
from goals import GOALS, goal, measure, verdict

BENCHMARKS = [train_step, reference_mode, generate_overhead, datamodule_throughput, cached_latents, build_workers]
HERE = Path(__file__).resolve().parent


def machine() -> dict[str, Any]:
    """What the figures depend on: cores, torch threads, load, versions."""
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


def table(results: list[dict[str, Any]], info: dict[str, Any]) -> str:
    """The Markdown summary (the README's benchmark table)."""
    rows = ["| benchmark | figure | goal | result | measured |", "| --- | --- | --- | --- | --- |"]
    rows += [f"| {r['name']} ({r['what']}) | {r['figure']:.3f} | {r['goal']} | {'pass' if r['passed'] else 'FAIL'} "
             f"| {r['detail']} |" for r in results]
    load = info["load_before"], info["machine"]["load_average"]
    rows.append(f"\n{info['date']}{' (--quick)' if info['quick'] else ''}, {info['repeats']} rounds; "
                f"{info['machine']['cores']} cores, {info['machine']['torch_threads']} torch threads, load average "
                f"(1/5/15 min) {'/'.join(map(str, load[0]))} before, {'/'.join(map(str, load[1]))} after.")
    return "\n".join(rows) + "\n"


def main() -> None:
    """Prepare all, run the rounds, write JSON and Markdown, exit 1 on any missed goal."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every benchmark at its reduced size (a smoke run)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all benchmarks")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every benchmark")
    p.add_argument("--only", nargs="+", choices=[b.NAME for b in BENCHMARKS], help="run only these benchmarks")
    a = p.parse_args()
    chosen = [b for b in BENCHMARKS if not a.only or b.NAME in a.only]
    load_before = [round(x, 2) for x in os.getloadavg()]
    with contextlib.ExitStack() as stack:
        rounds_of = {b.NAME: measure(b, ["--threads", str(a.threads)] + (["--quick"] if a.quick else []), stack)[0] for b in chosen}
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in rounds_of}
        for i in range(a.repeats):
            for name, one_round in rounds_of.items():
                print(f"round {i + 1}/{a.repeats}: {name}", file=sys.stderr, flush=True)
                rounds[name].append(one_round())
    results = [verdict(b.NAME, *b.figure(rounds[b.NAME])) for b in chosen]
    date = datetime.datetime.now(datetime.timezone.utc)
    info = {"date": date.strftime("%Y-%m-%d %H:%M UTC"), "quick": a.quick, "repeats": a.repeats,
            "load_before": load_before, "machine": machine(), "goals": {k: str(goal(k)) for k in GOALS}}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = a.out / (date.strftime("%Y-%m-%d") + ("-quick" if a.quick else ""))
    stem.with_suffix(".json").write_text(json.dumps({**info, "results": results, "rounds": rounds}, indent=2) + "\n")
    summary = table(results, info)
    stem.with_suffix(".md").write_text(summary)
    print(summary + f"\nwritten: {stem}.json, {stem}.md")
    problems = [msg for r in results for msg in r["problems"]]
    for msg in problems:
        print(f"FAIL {msg}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
