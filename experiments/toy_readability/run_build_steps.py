"""Exploration only: run some of the toy build's steps (e.g. renders vae expression) into ROOT with the expression
encoder's recipe overridden by RECIPE, a JSON object of ExpressionTraining fields (e.g. '{"steps": 4000}').
Usage: run_build_steps.py RECIPE ROOT STEP [STEP ...]"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
from blendexp.toyworld import assets
recipe = json.loads(sys.argv[1]); root = Path(sys.argv[2])
cfg = replace(assets.FULL, expression=replace(assets.FULL.expression, **recipe))
by = {s.name: s for s in assets.STEPS}
for name in sys.argv[3:]:
    t = time.perf_counter()
    m = by[name].run(root, cfg)
    (root / f"{name}.json").write_text(json.dumps({"wall_s": time.perf_counter() - t, "recipe": recipe, "metrics": m},
                                                  indent=1, default=str))
    print(name, time.perf_counter() - t, flush=True)
