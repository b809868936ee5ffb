"""Measure, over seeds and CPU code paths, the learned quantities the test suite asserts: the margins behind each
threshold, so the suite passes on any machine of this kind, not only on the one it was written on.

    uv run python scripts/measure_margins.py quick-build --seeds 0 1 2 3 4 --isa native avx2
    uv run python scripts/measure_margins.py closed-loop --seeds 0 1 --isa native avx2
    uv run python scripts/measure_margins.py train-overfit | reference-overfit | shipped
    uv run python scripts/measure_margins.py closed-loop-scale --seeds 0 1 2 --isa native   # a choice, on val

Each run calls the test module's ``measure_figures(seed, work)`` (what the test runs, such as the quick toy build or
the reduced closed loop, with that seed, in a fresh folder) in a fresh process; ``--isa avx2`` caps PyTorch's,
oneDNN's and MKL's kernels at AVX2 there (the code paths of a CPU without AVX-512, such as the AMD EPYC machines CI
also runs on): training on another CPU follows another floating-point path, so its outcome is a draw like another
seed. Writes ``tests/margins/<target>.json``: every run's
figures, each figure's worst value, and, for each threshold the tests declare (``THRESHOLDS`` in the test module),
the margin between that worst value and the threshold. Runs already in that file are kept and not repeated (the
sweep resumes); delete the file after changing what a target runs. ``--jobs 2`` runs two (seed, code path) pairs at
once, each on its share of the cores (recorded as ``threads``: another thread count is another floating-point path);
``--work DIR`` keeps each run's folder in DIR, so a later target reuses what an earlier one trained there (the closed
loop's calibration and its test run train the same adapters: closed-loop-scale, then closed-loop, with one DIR).
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "margins"
ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                                  "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


# what can be measured: the test module that declares THRESHOLDS and ``measure_figures(seed, work)``, or a module
# and another function of it whose figures are read to make a choice (no thresholds)
TARGETS = {"quick-build": "tests.toyworld.test_assets", "closed-loop": "tests.eval.test_closed_loop",
           "closed-loop-scale": "tests.eval.test_closed_loop:measure_validation_scales",
           "train-overfit": "tests.test_train", "reference-overfit": "tests.modules.test_reference",
           "shipped": "tests.toyworld.test_shipped"}
MEASURE = ("import json, sys; from pathlib import Path; from {module} import {function}; "
           "print('FIGURES ' + json.dumps({function}(int(sys.argv[1]), Path(sys.argv[2]))))")


def target(name: str) -> tuple[str, str]:
    """The (module, function) a target runs."""
    module, _, function = TARGETS[name].partition(":")
    return module, function or "measure_figures"


def measure(module: str, function: str, seed: int, env: dict[str, str], work: Path) -> dict[str, Any]:
    """The module's ``function`` in a fresh process whose kernels follow ``env`` (set before torch loads)."""
    start = time.perf_counter()
    code = MEASURE.format(module=module, function=function)
    proc = subprocess.run([sys.executable, "-c", code, str(seed), str(work)], cwd=REPO,
                          env={**os.environ, **env}, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"{module} (seed {seed}) failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("FIGURES ")][-1]
    return {"wall_s": round(time.perf_counter() - start, 1), **json.loads(line.removeprefix("FIGURES "))}


def measure_in(module: str, function: str, seed: int, isa: str, threads: dict[str, int],
               keep: Path | None) -> dict[str, Any]:
    """One run in its work folder (kept under ``keep``, else temporary), on ``threads`` threads if given."""
    env = {**ISA_ENV[isa], **{k: str(threads["threads"]) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if threads}}
    if keep:
        work = keep / f"{seed}-{isa}"
        work.mkdir(parents=True, exist_ok=True)
        return measure(module, function, seed, env, work)
    with tempfile.TemporaryDirectory(prefix="margins-") as work:
        return measure(module, function, seed, env, Path(work))


def cpu_name() -> str:
    """The processor's model name (what differs between machines of one kind)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


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
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each on cores/jobs threads")
    p.add_argument("--work", type=Path, default=None, help="keep each run's folder here (default: a temporary one)")
    a = p.parse_args()
    module, function = target(a.target)
    sys.path.insert(0, str(REPO))
    thresholds = importlib.import_module(module).THRESHOLDS if function == "measure_figures" else {}
    out = a.out or OUT / f"{a.target.replace('-', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text())["runs"] if out.is_file() else []
    runs = [r for r in previous if r["seed"] in a.seeds and r["isa"] in a.isa]  # kept: the sweep resumes
    todo = [(seed, isa) for seed in a.seeds for isa in a.isa  # seed-major: a cut-short sweep has whole seeds
            if not any(r["seed"] == seed and r["isa"] == isa for r in runs)]
    threads = {} if a.jobs == 1 else {"threads": max(1, (os.cpu_count() or 1) // a.jobs)}
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = {pool.submit(measure_in, module, function, seed, isa, threads, a.work): (seed, isa)
                   for seed, isa in todo}
        for future in as_completed(futures):
            seed, isa = futures[future]
            runs.append({"seed": seed, "isa": isa, **threads, "figures": future.result()})
            print(json.dumps(runs[-1]), flush=True)
            runs.sort(key=lambda r: (r["seed"], r["isa"]))
            write(out, runs, thresholds)  # after every run: a long sweep keeps what it did
    result = write(out, runs, thresholds)
    for name, s in result["thresholds"].items():
        print(f"{name:<40} {s['test']:<10} worst {s['worst']:.4f}  margin {s['margin']:+.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
