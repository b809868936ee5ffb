"""Measure, over seeds and CPU code paths, the learned quantities the test suite asserts: the margins behind each
threshold, so the suite passes on any machine of this kind, not only on the one it was written on.

    uv run python scripts/measure_margins.py quick-build --seeds 0 1 2 3 4 --isa native avx2
    uv run python scripts/measure_margins.py closed-loop --seeds 0 1 2 --isa native avx2

Each run is the user's command (the quick toy build, the reduced closed loop of tests/eval/test_closed_loop.py) in a
fresh folder; ``--isa avx2`` runs it with PyTorch's, oneDNN's and MKL's kernels capped at AVX2 (the code paths of a
CPU without AVX-512, such as the AMD EPYC machines CI also runs on); training on another CPU follows another
floating-point path, so its outcome is a draw like another seed. Writes ``tests/margins/<target>.json``: every run's
figures, each figure's worst value, and, for each threshold the tests declare (``THRESHOLDS`` in the test module),
the margin between that worst value and the threshold. Runs already in that file are kept and not repeated (the
sweep resumes); delete the file after changing what a target runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "margins"
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def run(cmd: list[str], env: dict[str, str], timeout: int = 7200) -> float:
    """Run one user command; its wall time, or stop with its output when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, text=True, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def quick_build(seed: int, env: dict[str, str], work: Path) -> dict[str, Any]:
    """The quick toy build (tests/toyworld/test_assets.py) with ``--seed``: its figures from metrics.json."""
    from tests.toyworld.test_assets import quick_build_figures

    root = work / "toy"
    wall = run([sys.executable, "-m", "blendexp.toyworld.assets", "--root", str(root), "--quick", "--seed", str(seed)],
               env)
    return {"wall_s": round(wall, 1), **quick_build_figures(json.loads((root / "metrics.json").read_text()))}


def closed_loop(seed: int, env: dict[str, str], work: Path) -> dict[str, Any]:
    """The reduced closed loop of tests/eval/test_closed_loop.py with ``--seed``: its ratios."""
    from tests.eval.test_closed_loop import closed_loop_command, closed_loop_figures, toy_data

    data = toy_data(work / "data")
    wall = run([*closed_loop_command(data, work / "out"), "--seed", str(seed)], env)
    return {"wall_s": round(wall, 1), **closed_loop_figures(work / "out")}


def cpu_name() -> str:
    """The processor's model name (what differs between machines of one kind)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


TARGETS: dict[str, tuple[Callable[[int, dict[str, str], Path], dict[str, Any]], str]] = {
    "quick-build": (quick_build, "tests.toyworld.test_assets"),
    "closed-loop": (closed_loop, "tests.eval.test_closed_loop"),
}


def summarise(runs: list[dict[str, Any]], thresholds: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """Each thresholded figure's worst run and its margin to the threshold (positive: every run passes)."""
    out = {}
    for name, (op, limit) in thresholds.items():
        values = [r["figures"][name] for r in runs]
        higher = op.startswith(">")
        worst, best = (min(values), max(values)) if higher else (max(values), min(values))
        out[name] = {"test": f"{op} {limit}", "worst": worst, "best": best,
                     "margin": round(worst - limit if higher else limit - worst, 4)}
    return out


def write(out: Path, runs: list[dict[str, Any]], thresholds: dict[str, tuple[str, float]]) -> dict[str, Any]:
    """The measurements file: the command, the machine, each threshold's margin and every run."""
    result = {"command": " ".join(["python", "scripts/measure_margins.py", *sys.argv[1:]]),
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
              "thresholds": summarise(runs, thresholds), "runs": runs}
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> None:
    """Run the target once per (seed, code path) and write the measurements next to the tests."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--isa", nargs="+", choices=sorted(ISA_ENV), default=["native", "avx2"])
    p.add_argument("--out", type=Path, default=None, help="default: tests/margins/<target>.json")
    a = p.parse_args()
    measure, module = TARGETS[a.target]
    sys.path.insert(0, str(REPO))
    thresholds = importlib.import_module(module).THRESHOLDS
    out = a.out or OUT / f"{a.target.replace('-', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = [r for r in previous if r["seed"] in a.seeds and r["isa"] in a.isa]  # kept: the sweep resumes
    for seed in a.seeds:  # seed-major, so a cut-short sweep has every code path of its first seeds
        for isa in a.isa:
            if any(r["seed"] == seed and r["isa"] == isa for r in runs):
                continue
            with tempfile.TemporaryDirectory(prefix=f"margins-{a.target}-") as work:
                figures = measure(seed, ISA_ENV[isa], Path(work))
            runs.append({"seed": seed, "isa": isa, "figures": figures})
            print(json.dumps(runs[-1]), flush=True)
            write(out, runs, thresholds)  # after every run: a long sweep keeps what it did
    result = write(out, runs, thresholds)
    for name, s in result["thresholds"].items():
        print(f"{name:<40} {s['test']:<10} worst {s['worst']:.4f}  margin {s['margin']:+.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
