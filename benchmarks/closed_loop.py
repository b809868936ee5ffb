"""Closed loop in the toy world: do trained adapters do what they are asked, as the toy annotators read it back?

    python benchmarks/closed_loop.py [--toy .cache/toy] [--expr-steps 4500] [--ref-steps 600] [--expr-scale 2] [--check]

``--toy`` is the root ``python -m blendexp.toyworld.assets`` builds: the trained toy Arc2Face base (``base/``), its
still shards (``shards/``), talking-head clip shards (``clips/``), the toy ArcFace ONNX and SMIRK checkpoint in the
official layout (``annotators/``) and the build's ``metrics.json``; or the repository's copy ``data/toy`` (models
only: then ``--data`` names a folder with ``shards/`` and ``clips/``). Through the user entry points, the benchmark
trains an Expression Adapter on the base and stills (``EXPR_RECIPE``), then a Reference Adapter on clip pairs with
that Expression Adapter frozen (each reused when its run folder already holds an export), and evaluates
``arc2face``, ``expr_adapter`` and ``expr_ref`` on 12 held-out toy faces × the expressions of all 128 held-out faces.

Goals, all measured in this run, each ratio with a two-way bootstrap 95% interval (sources and targets resampled
independently, ``--resamples``):
  * pooled expression error of expr_adapter <= 0.5x arc2face's with the interval's top <= 0.6, over the components
    the toy SMIRK reads on decoded faces (MAE on VAE round trips of held-out faces at most half the mean
    predictor's in metrics.json: on the others every method gets the annotator's own error);
  * ID similarity of expr_adapter >= 0.9x arc2face's;
  * expr_ref's background L1 to the reference photo below expr_adapter's: the interval's top < 1 (the Reference
    Adapter keeps appearance).
Prints the table, each readable component's error and target/read correlation per method, and writes all of it to
``<out>/closed_loop.json`` (``closed_loop_scale<s>.json`` at another ``--expr-scale``); with ``--check`` exits 1 when a
goal is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from blendexp.data.image_sets import Skipped, read_images
from blendexp.eval.metrics import cell_totals, two_way_ratio

REPO = Path(__file__).resolve().parent.parent
EXPR_GOAL, EXPR_HIGH, ID_GOAL, READABLE = 0.5, 0.6, 0.9, 0.5  # ratio goals; EXPR_HIGH: its interval's top
# The Expression Adapter recipe of the closed loop (experiments/input_scale): an MLP projection to 16 tokens, trained
# as if the jaw were read 30x and the eyelids 10x, steers the toy jaw most precisely of the variants measured.
EXPR_RECIPE = ("model.adapter.projection=mlp", "model.adapter.num_tokens=16",
               "model.adapter.input_scale={exp:1.0,eyelid:10.0,jaw:30.0}")
# The adapter's scale at evaluation, calibrated on training identities x training expressions (never the held-out
# test faces; a hand-written sampling loop of the same settings on 12 x 12 training pairs): jaw MAE 0.057 / 0.048 /
# 0.041 / 0.040 at scale 1 / 1.5 / 2 / 2.5 while ID similarity falls; 2 is where the gain levels off.
EXPR_SCALE = 2.0


def toy_layout(toy: Path) -> dict[str, Path]:
    """Where each model is: in the repository's copy (data/toy, one official models folder) or in a build root."""
    shipped = (toy / "models" / "arc2face").is_dir()
    models = toy / "models" if shipped else toy / "base" / "models"
    annotators = models if shipped else toy / "annotators"
    return {"models": models, "sd15": models.parent / "stable-diffusion-v1-5", "metrics": toy / "metrics.json",
            "arcface": annotators / "antelopev2/arcface.onnx", "smirk": annotators / "smirk/SMIRK_em1.pt"}


def missing_assets(toy: dict[str, Path], data: Path) -> list[str]:
    """Every toy-world file the check needs that is not there."""
    need = [toy["arcface"], toy["smirk"], toy["metrics"], toy["models"] / "arc2face/config.json",
            toy["sd15"] / "vae/config.json"]
    missing = [str(p) for p in need if not p.is_file()]
    missing += [str(data / folder / f"{split}-*.tar") for folder, split in (("shards", "train"), ("shards", "val"),
                                                                            ("clips", "clips"))
                if not any((data / folder).glob(f"{split}-*.tar"))]
    return missing


def readable_components(toy: dict[str, Path]) -> list[str]:
    """FLAME components the toy SMIRK reads on decoded faces: MAE on VAE round trips of held-out faces at most
    ``READABLE`` x the mean predictor's (a generated face is never sharper than its decoder's round trip)."""
    per = json.loads(toy["metrics"].read_text())["expression_encoder"]["per_component_mae_vs_mean_predictor_decoded"]
    return [name.split(" (")[0] for name, (mae, mean) in per.items() if mae <= READABLE * mean]


def base_overrides(toy: dict[str, Path]) -> list[str]:
    """Point an entry point at the trained toy base (whatever the embedded default is)."""
    return [f"paths.models={toy['models']}", f"paths.sd15={toy['sd15']}"]


def run(module: str, *overrides: str) -> None:
    """Run an entry point as a user would; stop with its output when it fails, else say how long it took."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"{module} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print(f"{module}: {time.perf_counter() - start:.0f} s", flush=True)


def train(experiment: str, out: Path, toy: dict[str, Path], data: Path, steps: int, a: argparse.Namespace,
          *overrides: str) -> Path:
    """One adapter's run folder, trained now unless a finished export is already there."""
    run_dir = out / experiment / "closed_loop"
    if (run_dir / "export").is_dir() and any((run_dir / "export").iterdir()):
        print(f"reusing {run_dir}")
        return run_dir
    trainer = ["trainer=gpu"] if a.device.startswith("cuda") else []
    run("blendexp.train", f"+experiment={experiment}", "run_name=closed_loop", f"paths.outputs={out}", f"seed={a.seed}",
        *base_overrides(toy), "model.base.tiny_root=null", f"data.val_shards={data}/shards/val-*.tar",
        f"trainer.max_steps={steps}", "callbacks.samples.every_n_steps=0", *trainer, *overrides)
    return run_dir


def mean_expression(shards: str, path: Path) -> Path:
    """Write the mean FLAME vector of the training shards (the negative expression ``--negative-expression mean``)."""
    skipped: list[Skipped] = []
    exps = [item.exp for item in read_images(shards, "training expression", skipped)]
    if skipped:
        print(f"mean expression: skipped {len(skipped)} unreadable shard members of {shards}")
    np.save(path, np.mean(exps, axis=0).astype(np.float32))
    return path


def evaluate(out: Path, toy: dict[str, Path], data: Path, expr: Path, ref: Path, a: argparse.Namespace) -> Path:
    """All three methods on held-out toy faces, scored by the toy annotators; the report folder."""
    shards = data / "shards"
    name = "closed_loop" if a.expr_scale == EXPR_SCALE else f"closed_loop_scale{a.expr_scale:g}"  # a cache per scale
    negative = []
    if a.negative_expression == "mean":
        name += "_negmean"
        mean = mean_expression(f"{shards}/train-*.tar", out / "train_mean_expression.npy")
        negative = [f"eval.methods.{m}.negative_expression={mean}" for m in ("expr_adapter", "expr_ref")]
    run("blendexp.evaluate", f"run_name={name}", f"paths.outputs={out}", f"device={a.device}", f"seed={a.seed}",
        *base_overrides(toy), "eval.base.tiny_root=null",
        f"eval.sources.path={shards}/val-*.tar", f"eval.sources.limit={a.sources}",
        f"eval.targets.path={shards}/val-*.tar", "eval.targets.per_subject=null", "eval.targets.offset=0",
        f"eval.targets.limit={a.targets}", f"eval.generation.size={a.size}", f"eval.generation.steps={a.gen_steps}",
        f"eval.generation.samples={a.samples}", f"eval.methods.expr_adapter.adapter={expr}",
        f"eval.methods.expr_ref.ref_adapter={ref}", f"eval.methods.expr_ref.exp_adapter={expr}",
        f"eval.methods.expr_adapter.scale={a.expr_scale}", f"eval.methods.expr_ref.scale={a.expr_scale}",
        "eval.annotators.tiny_root=null", "eval.annotators.facenet=null", "eval.annotators.generated=aligned",  # toy
        f"eval.annotators.arcface={toy['arcface']}", f"eval.annotators.smirk={toy['smirk']}", *negative)
    return out / "evaluate" / name


def cells(frame: pd.DataFrame, sources: dict[str, int], targets: dict[str, int], value: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per (source, target) pair: sum and count of one per-image value (the two-way bootstrap's input)."""
    return cell_totals(frame[value].to_numpy(float), frame["source"].map(sources).to_numpy(),
                       frame["target"].map(targets).to_numpy(), (len(sources), len(targets)))


def summarise(report: Path, readable: list[str], resamples: int, seed: int) -> dict[str, object]:
    """Per-method scores, per readable component error and target/read correlation, the three ratios with two-way
    bootstrap 95% intervals (sources and targets resampled), and whether each goal is met."""
    images = pd.read_csv(report / "per_image.csv")
    readings = pd.read_csv(report / "expression_per_image.csv")
    errors = pd.DataFrame({c: (readings[f"read.{c}"] - readings[f"target.{c}"]).abs() for c in readable})
    readings["exp_mae_readable"] = errors.mean(axis=1)
    rows = {r["method"]: r for r in pd.read_csv(report / "results.csv").to_dict("records")}
    components = {c: {m: {"mae": float(errors.loc[g.index, c].mean()),
                          "corr": float(np.corrcoef(g[f"target.{c}"], g[f"read.{c}"])[0, 1])}
                      for m, g in readings.groupby("method")} for c in readable}
    methods = {m: {"exp_mae_readable": float(readings.loc[readings["method"] == m, "exp_mae_readable"].mean()),
                   "exp_mae": float(rows[m]["exp_mae"]), "id_sim": float(rows[m]["id_sim"]),
                   "bg_l1": float(rows[m]["bg_l1"])} for m in rows}
    sources = {s: i for i, s in enumerate(sorted(images["source"].unique()))}
    targets = {t: i for i, t in enumerate(sorted(images["target"].unique()))}

    def ratio(frame: pd.DataFrame, value: str, ours: str, theirs: str) -> dict[str, float]:
        est = two_way_ratio(cells(frame[frame["method"] == ours], sources, targets, value),
                            cells(frame[frame["method"] == theirs], sources, targets, value), resamples, seed)
        return {"ratio": est.mean, "low": est.low, "high": est.high}

    expr = ratio(readings, "exp_mae_readable", "expr_adapter", "arc2face")
    ident = ratio(images, "id_sim", "expr_adapter", "arc2face")
    bg = ratio(images, "bg_l1", "expr_ref", "expr_adapter")
    base_id = methods["arc2face"]["id_sim"]
    return {"readable_components": readable, "methods": methods, "components": components,
            "intervals": {"expr_ratio": expr, "id_ratio": ident, "bg_l1_ref_vs_expr": bg,
                          "resamples": resamples, "over": "sources and targets, each resampled with replacement"},
            "expr_ratio": expr["ratio"], "expr_goal_met": expr["ratio"] <= EXPR_GOAL and expr["high"] <= EXPR_HIGH,
            "id_ratio": ident["ratio"], "id_goal_met": bool(base_id > 0 and ident["ratio"] >= ID_GOAL),
            "bg_l1_ref_vs_expr": bg["ratio"], "ref_goal_met": bg["high"] < 1}


def main() -> None:
    """Check the assets, train or reuse both adapters, evaluate, print and save the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", type=Path, default=REPO / ".cache" / "toy",
                   help="root of the built toy assets (python -m blendexp.toyworld.assets --root ...), or the copy "
                        "the repository ships in data/toy")
    p.add_argument("--data", type=Path, default=None, help="where shards/ and clips/ are (default: --toy)")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "closed_loop")
    p.add_argument("--expr-steps", type=int, default=4500, help="Expression Adapter steps (when not reused)")
    p.add_argument("--expr-overrides", nargs="*", default=list(EXPR_RECIPE),
                   help="Hydra overrides of the Expression Adapter run (default: the closed loop's recipe; give the "
                        "flag alone for the plain +experiment=expr_adapter)")
    p.add_argument("--ref-steps", type=int, default=600, help="Reference Adapter steps (when not reused)")
    p.add_argument("--expr-scale", type=float, default=EXPR_SCALE,
                   help="the Expression Adapter's scale at evaluation, in both methods that carry it (default: "
                        "calibrated on training pairs)")
    p.add_argument("--negative-expression", choices=("zeros", "mean"), default="zeros",
                   help="the FLAME vector classifier-free guidance pushes away from: zeros (as adapters are "
                        "trained) or the training shards' mean expression")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sources", type=int, default=12, help="held-out source faces")
    p.add_argument("--targets", type=int, default=128,
                   help="target expressions: the first N held-out faces (default: all 16 x 8 of the toy build's "
                        "validation shards; the first 12, two subjects' faces, gave Arc2Face a jaw error 0.75x the "
                        "full set's)")
    p.add_argument("--samples", type=int, default=1, help="seeds per (source, target) pair")
    p.add_argument("--gen-steps", type=int, default=20, help="sampling steps")
    p.add_argument("--size", type=int, default=64, help="image size (the toy shards' size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of both trainings and of the evaluation's samples")
    p.add_argument("--resamples", type=int, default=2000, help="two-way bootstrap resamples of the intervals")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is not met")
    a = p.parse_args()
    toy, out = toy_layout(a.toy.resolve()), a.out.resolve()
    data = (a.data or a.toy).resolve()
    missing = missing_assets(toy, data)
    if missing:
        sys.exit("closed loop: toy-world assets missing:\n  " + "\n  ".join(missing) + "\nBuild them first: "
                 f"python -m blendexp.toyworld.assets --root {a.toy}")
    expr = train("expr_adapter", out, toy, data, a.expr_steps, a, f"data.batch_size={a.batch_size}",
                 f"data.sources.stills.shards={data}/shards/train-*.tar", *a.expr_overrides)
    # clip frames pair within their clip; the held-out stills (validation) pair within their subject
    ref = train("ref_adapter", out, toy, data, a.ref_steps, a, f"data.batch_size={a.batch_size}",
                f"data.sources.stills.shards={data}/clips/clips-*.tar", "data.pairs.stills=true",
                f"model.expression_adapter={expr}")
    report = evaluate(out, toy, data, expr, ref, a)
    result = {"expr_scale": a.expr_scale, "negative_expression": a.negative_expression, "seed": a.seed,
              **summarise(report, readable_components(toy), a.resamples, a.seed)}
    (out / f"{report.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"readable components: {', '.join(result['readable_components'])}")
    print(f"{'method':<14}{'expr MAE (readable)':>21}{'expr MAE (all)':>16}{'ID sim':>9}{'bg L1 to ref':>14}")
    for m, v in result["methods"].items():
        print(f"{m:<14}{v['exp_mae_readable']:>21.4f}{v['exp_mae']:>16.4f}{v['id_sim']:>9.3f}{v['bg_l1']:>14.4f}")
    for c, per in result["components"].items():
        print(f"{c}: " + ", ".join(f"{m} MAE {v['mae']:.4f} r {v['corr']:.2f}" for m, v in per.items()))
    goals = [("expr_adapter / arc2face expression error", "expr_ratio", f"<= {EXPR_GOAL}, interval top <= {EXPR_HIGH}",
              "expr_goal_met"),
             ("expr_adapter / arc2face ID similarity", "id_ratio", f">= {ID_GOAL}", "id_goal_met"),
             ("expr_ref / expr_adapter background L1", "bg_l1_ref_vs_expr", "interval top < 1", "ref_goal_met")]
    for label, key, goal, met in goals:
        ci = result["intervals"][key]
        print(f"{label}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] "
              f"(goal {goal}: {'met' if result[met] else 'NOT met'})")
    if a.check and not all(result[key] for *_, key in goals):
        sys.exit(1)


if __name__ == "__main__":
    main()
