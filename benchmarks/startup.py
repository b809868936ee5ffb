"""Wall time of ``--help`` and ``--cfg job`` for every entry point, as a user starts them (a fresh interpreter each).

    python benchmarks/startup.py [--repeats 3] [--out benchmarks/results/startup.json]

Each command runs ``repeats`` times; the fastest run counts (background load on a shared machine only adds time).
Goal: every command under 3 s, because heavy libraries (torch, Lightning, diffusers) load after composition.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from blendexp.config import REPO_ROOT

HYDRA = ["blendexp.train", "blendexp.evaluate", "blendexp.generate", "blendexp.demo", "blendexp.controllability",
         "blendexp.data.build"]
ARGPARSE = ["blendexp.report", "blendexp.toyworld.shards", "blendexp.models.tiny", "blendexp.models.full_size",
            "blendexp.toyworld.assets"]
GOAL_S = 3.0


def wall_s(cmd: list[str], repeats: int) -> float:
    """Fastest wall time of ``repeats`` runs of ``cmd`` (which must succeed)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    """Measure every command, print a table and write the JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "startup.json")
    args = p.parse_args()
    commands = [(m, flag) for m in HYDRA for flag in ("--help", "--cfg job")] + [(m, "--help") for m in ARGPARSE]
    rows = [{"module": m, "flag": flag, "wall_s": round(wall_s([sys.executable, "-m", m, *flag.split()],
                                                                   args.repeats), 3)} for m, flag in commands]
    for r in rows:
        print(f"{r['module']:<28} {r['flag']:<10} {r['wall_s']:6.2f} s {'ok' if r['wall_s'] < GOAL_S else 'SLOW'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"goal_s": GOAL_S, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
