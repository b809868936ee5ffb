"""Array jobs on SLURM: a shard build and an evaluation as 2 array tasks against the same work as 1 task.

    python benchmarks/scale_out.py [--tasks 2] [--subjects 48] [--pairs 16] [--repeats 1] [--check] [--quick]

Needs a SLURM cluster (``SLURM_CONF``; without one the local cluster is started with scripts/slurm/start.sh, which
needs root). Each side is the command a user runs, timed from submission to its end: the reference submits the work
as one task (``array.size=1``), the measured path as ``--tasks`` array tasks (``array.size=N 'array.index=range(N)'``)
followed by the merge (``array.index=merge``, a local command). The build renders toy-world stills and clips
(``data/build=toy``, ``--subjects`` per split) and annotates them with MTCNN and tiny random annotators; the
evaluation is the embedded default (shipped toy base and annotators, three methods) on ``--pairs`` sources x
``--pairs`` targets x 2 samples from the sample validation shards. Figures (goals in goals.py, for 2 tasks on 2 free cores): the speed-up of the
array step; printed with it, the merge's share of the array path's total (the merge command's start-up included)
and the end-to-end speed-up. The array build must hold the same samples, byte for byte, as the one-task build, and
the array evaluation must score as many images per method; otherwise the benchmark fails. Every task gets one core
(``hydra.launcher.cpus_per_task=1``). Writes ``benchmarks/results/scale_out-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from goals import verdict

REPO = Path(__file__).resolve().parent.parent
QUICK = ["--subjects", "2", "--pairs", "2"]
# The sample shards' 8 validation subjects, 4 faces each: sources from the first, targets from the next ones.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=120"]


def cluster() -> dict[str, str]:
    """The environment for SLURM commands: the running cluster's, or the local one started now."""
    if os.environ.get("SLURM_CONF"):
        return dict(os.environ)
    res = subprocess.run(["bash", str(REPO / "scripts/slurm/start.sh")], capture_output=True, text=True, timeout=900)
    found = re.search(r"export SLURM_CONF=(\S+)", res.stdout)
    if res.returncode or not found:
        sys.exit(f"no SLURM cluster: set SLURM_CONF, or run as root so scripts/slurm/start.sh can start one\n"
                 f"{res.stderr[-2000:]}")
    return {**os.environ, "SLURM_CONF": found.group(1)}


def timed(module: str, args: list[str], env: dict[str, str], multirun: bool = False) -> float:
    """Wall seconds of one user command (``-m``: submitted to SLURM and waited for); fails loudly."""
    cmd = [sys.executable, "-m", module, *(["-m"] if multirun else []), *args]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
    if res.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def samples(out: Path) -> Counter:
    """Every tar member of a build (name and bytes), however the members are grouped into shards."""
    from blendexp.data.datamodule import tar_members

    found: Counter = Counter()
    for shard in out.glob("*.tar"):
        found.update(tar_members(shard))
    return found


def build_inputs(root: Path, a: argparse.Namespace) -> list[str]:
    """Render the toy inputs and write the tiny annotators once, untimed; the build options that use them."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import call

    from blendexp.config import CONF_DIR
    from blendexp.faces.annotators import ensure_tiny_annotators

    options = ["data/build=toy", f"toy.out={root}/toy", f"tiny_annotators={root}/annotators", "num_workers=0",
               f"toy.stills.subjects={a.subjects}", f"toy.videos.subjects={a.subjects}", "images_per_task=4"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        call(compose("build", overrides=options).toy, _convert_="all")
    ensure_tiny_annotators(root / "annotators", facenet=False)
    return options


def build_round(root: Path, a: argparse.Namespace, env: dict[str, str], run: int) -> dict[str, Any]:
    """The toy build as one task, then as ``--tasks`` array tasks and the merge."""
    common = [*build_inputs(root, a), f"paths.outputs={root}/logs", *SLURM]
    one, many = root / f"one-{run}", root / f"many-{run}"
    t_one = timed("blendexp.data.build", [*common, f"out={one}", f"hydra.sweep.dir={one}-sweep"], env, True)
    array = [*common, f"out={many}", f"array.size={a.tasks}"]
    t_many = timed("blendexp.data.build", [*array, f"hydra.sweep.dir={many}-sweep",
                                           f"array.index=range({a.tasks})"], env, True)
    t_merge = timed("blendexp.data.build", [*array, "array.index=merge"], env)
    return {"one": t_one, "many": t_many, "merge": t_merge, "same": samples(one) == samples(many)}


def eval_round(root: Path, a: argparse.Namespace, env: dict[str, str], run: int) -> dict[str, Any]:
    """The default evaluation as one task, then as ``--tasks`` array tasks and the merge."""
    common = [f"eval.sources.limit={a.pairs}", f"eval.targets.limit={a.pairs}", "eval.generation.samples=2",
              "eval.sources.per_subject=4", "eval.targets.per_subject=4", f"eval.targets.offset={a.pairs}",
              "threads=1", f"paths.outputs={root}/logs", *SLURM]
    one, many = root / f"eval-one-{run}", root / f"eval-many-{run}"
    t_one = timed("blendexp.evaluate", [*common, f"out_dir={one}", f"hydra.sweep.dir={one}-sweep"], env, True)
    array = [*common, f"array.size={a.tasks}", f"array.dir={many}"]
    t_many = timed("blendexp.evaluate", [*array, f"hydra.sweep.dir={many}-sweep", f"array.index=range({a.tasks})"],
                   env, True)
    t_merge = timed("blendexp.evaluate", [*array, "array.index=merge"], env)
    images = [list(pd.read_csv(d / "results.csv")["images"]) for d in (one, many)]
    return {"one": t_one, "many": t_many, "merge": t_merge, "same": images[0] == images[1], "images": images[0]}


def figure(name: str, rounds: list[dict[str, Any]], tasks: int) -> dict[str, Any]:
    """Speed-up of the array step (fastest of each side), the merge's share and the end-to-end speed-up."""
    one, many = min(r["one"] for r in rounds), min(r["many"] for r in rounds)
    merge = min(r["merge"] for r in rounds)
    detail = (f"1 task {one:.1f} s, {tasks} tasks {many:.1f} s + merge {merge:.1f} s (merge {merge / (many + merge):.0%}"
              f" of the array path; end to end {one / (many + merge):.2f}x)")
    problems = [] if all(r["same"] for r in rounds) else [f"{name}: the array's output differs from one task's"]
    return {**verdict(name, one / many, detail, problems), "merge_share": merge / (many + merge),
            "end_to_end": one / (many + merge)}


def main() -> None:
    """Rounds of both benchmarks, figures, JSON; ``--check`` exits 1 on a missed goal."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--subjects", type=int, default=48,
                   help="toy subjects per split of the build: enough work that each task's start-up weighs little")
    p.add_argument("--pairs", type=int, default=16, help="sources (and targets) of the evaluation, at most 16")
    p.add_argument("--repeats", type=int, default=1, help="rounds (each takes minutes)")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--quick", action="store_true", help="reduced size (a smoke run; start-up dominates)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args()
    if a.quick:
        a = p.parse_args([*QUICK, *sys.argv[1:]])
    env = {**cluster(), "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, one_round in (("scale_out_build", build_round), ("scale_out_eval", eval_round)):
            rounds = [one_round(root, a, env, r) for r in range(a.repeats)]
            results.append({**figure(name, rounds, a.tasks), "rounds": rounds})
            print(f"{name}: {results[-1]['figure']:.3f} (goal {results[-1]['goal']}): {results[-1]['detail']}",
                  flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"scale_out-{stamp:%Y-%m-%d}{'-quick' if a.quick else ''}.json"
    info = {"date": f"{stamp:%Y-%m-%d %H:%M} UTC", "args": vars(a) | {"out": str(a.out)}, "cores": os.cpu_count(),
            "load_average": os.getloadavg()}
    path.write_text(json.dumps({**info, "results": results}, indent=2, default=str) + "\n")
    print(f"written: {path}")
    problems = [msg for r in results for msg in r["problems"]]
    for msg in problems:
        print(f"FAIL {msg}", file=sys.stderr)
    sys.exit(1 if a.check and problems else 0)


if __name__ == "__main__":
    main()
