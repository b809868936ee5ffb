"""Benchmark goals and their checks in one place, so every script and ``run_all.py`` judge a figure the same way.

A benchmark module defines ``NAME``, ``parser()`` (its options, with ``QUICK`` the reduced-size ones),
``prepare(args, stack)`` returning a function that times the user's path and its reference once each (alternating),
and ``figure(rounds)`` turning those rounds into ``(ratio, detail)``. ``BLENDEXP_BENCH_GOALS="name=value,..."``
overrides goals (e.g. an impossible one, to see ``--check`` fail).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

ENV = "BLENDEXP_BENCH_GOALS"
Round = dict[str, Any]


@dataclass(frozen=True)
class Goal:
    """A bound on a ratio: ``op`` is ``<=`` (the user's path may cost at most this) or ``>=`` (must reach this)."""

    op: str
    value: float
    what: str

    def met(self, figure: float) -> bool:
        """Whether ``figure`` satisfies the bound."""
        return figure <= self.value if self.op == "<=" else figure >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


GOALS = {
    "train_step": Goal("<=", 1.03, "Trainer as `blendexp.train` builds it / bare PyTorch loop, time per step"),
    "reference_mode": Goal("<=", 1.25, "ExpressionPipeline with a reference / plain diffusers pipeline, 25 steps"),
    "datamodule_throughput": Goal(">=", 0.90, "DataModule training stream / raw webdataset decoding, samples/s"),
    "generate_overhead": Goal("<=", 1.02, "ExpressionPipeline / plain diffusers pipeline, same images"),
    "build_workers": Goal(">=", 1.8, "shard build, 2 workers / 1 worker, wall-clock speed-up"),
    "cached_latents": Goal(">=", 1.5, "training step, VAE encoding on the fly / cached latents, 256 px"),
    # scale_out.py (its own command: it needs a SLURM cluster and takes many minutes, so run_all.py leaves it out)
    "scale_out_build": Goal(">=", 1.7, "shard build on SLURM, 1 task / 2 array tasks, wall-clock speed-up"),
    "scale_out_eval": Goal(">=", 1.7, "evaluation on SLURM, 1 task / 2 array tasks, wall-clock speed-up"),
}


def goal(name: str) -> Goal:
    """The goal of benchmark ``name``, with any ``BLENDEXP_BENCH_GOALS`` override applied."""
    base = GOALS[name]
    for item in filter(None, os.environ.get(ENV, "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in GOALS:
            raise ValueError(f"{ENV}: unknown benchmark {key.strip()!r}; known: {', '.join(GOALS)}")
        if key.strip() == name:
            return Goal(base.op, float(value), base.what)
    return base


def check_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options every benchmark shares: ``--check``, ``--repeats``, ``--quick``."""
    parser.add_argument("--check", action="store_true", help="exit 1 when the goal is missed")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the fastest of each side counts")
    parser.add_argument("--quick", action="store_true", help="reduced size (a smoke run; the figure is noisier)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (1: steadiest when other jobs share the cores)")
    return parser


def alternating(sides: dict[str, Callable[[], float]], extra: Callable[[], Round] | None = None,
                times: int = 1) -> Callable[[], Round]:
    """One round: every side timed ``times`` times (the fastest counts), the order reversed at every pass so no side
    always runs first; on this 2-core VM one call's time drifts by up to 30% between seconds, so short calls take
    several passes per round."""
    turn = itertools.count()

    def one_round() -> Round:
        best: dict[str, float] = {}
        for _ in range(times):
            order = list(sides.items())
            if next(turn) % 2:
                order.reverse()
            for name, run in order:
                best[name] = min(best.get(name, float("inf")), run())
        return {**best, **(extra() if extra else {})}

    return one_round


def verdict(name: str, figure: float, detail: str, problems: list[str] | None = None) -> dict[str, Any]:
    """The result record: figure, goal, pass/fail; ``problems`` (e.g. unequal images) fail it whatever the figure."""
    g = goal(name)
    problems = list(problems or [])
    if not g.met(figure):
        problems.append(f"{name}: figure {figure:.3f} misses the goal {g}")
    return {"name": name, "figure": round(figure, 4), "goal": str(g), "what": g.what, "passed": not problems,
            "detail": detail, "problems": problems}


def measure(module: ModuleType, argv: list[str], stack: contextlib.ExitStack) -> tuple[Callable[[], Round], Any]:
    """Parse ``argv`` (plus the module's ``QUICK`` options with ``--quick``) and prepare one round of ``module``."""
    args = module.parser().parse_args(argv)
    if args.quick:
        args = module.parser().parse_args([*module.QUICK, *argv])
    torch.set_num_threads(args.threads)
    return module.prepare(args, stack), args


def standalone(module: ModuleType) -> None:
    """Run one benchmark from its own command line: rounds, figure, and with ``--check`` exit 1 on a miss."""
    with contextlib.ExitStack() as stack:
        one_round, args = measure(module, sys.argv[1:], stack)
        rounds = [one_round() for _ in range(args.repeats)]
    result = verdict(module.NAME, *module.figure(rounds))
    print(f"{result['detail']}\n{module.NAME}: {result['figure']:.3f} (goal {result['goal']}, torch threads "
          f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}): {'pass' if result['passed'] else 'FAIL'}")
    for problem in result["problems"]:
        print(f"FAIL {problem}", file=sys.stderr)
    if args.check and not result["passed"]:
        sys.exit(1)
