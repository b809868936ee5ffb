"""Closed loop in the toy world: do trained adapters do what they are asked, as the toy annotators read it back?

    python -m blendexp.toyworld.assets --data-only                # .cache/toy/{shards,clips}, about a minute
    python benchmarks/closed_loop.py --split val --calibrate      # choose the adapter scale on validation
    python benchmarks/closed_loop.py [--check]                    # report on the test split

``--toy`` holds the models: the repository's copy ``data/toy`` (default: the shipped toy Arc2Face base, toy ArcFace
ONNX and SMIRK checkpoint in the official layout, and its build's ``metrics.json``), or a build root of ``python -m
blendexp.toyworld.assets`` (``base/``, ``annotators/``). ``--data`` holds the still shards (``shards/``) and
talking-head clip shards (``clips/``): a build root, or what ``--data-only`` writes for the shipped models (default
``.cache/toy``). Through the user entry points, the benchmark
trains an Expression Adapter on the base and stills (``+experiment=closed_loop_expr``), then a Reference Adapter on
clip pairs with that Expression Adapter frozen (``+experiment=closed_loop_ref``; each reused when its run folder
already holds an export), and evaluates ``arc2face``, ``expr_adapter`` and ``expr_ref`` on one split of the
held-out stills.

Splits, fixed here before any tuning: the held-out stills' subjects (in shard order, never trained on) are halved;
``val`` is the first half, ``test`` the second. Each split's sources are one face per subject and its targets the
expressions of its own faces, so validation and test share no identity and no target expression. Every choice is
made on ``val``: ``--calibrate`` evaluates the Expression Adapter at each scale of a grid on ``val`` and writes the
chosen one (the lowest expression error among the scales that keep ID similarity >= 0.9x Arc2Face's) to
``--calibration``, with what it was made with (split, base, adapter, data, negative expression, guidance scale).
A ``test`` run reads that file, refuses one made with anything else, and records it; ``--expr-scale`` overrides it
(recorded as such).
Both runs' configs are composed, and the calibration checked against all but the adapter, before anything trains:
a mistyped ``--expr-overrides`` / ``--ref-overrides`` or a wrong calibration stops in seconds, not hours.

Goals (on ``test``), each ratio with a two-way bootstrap 95% interval (sources and targets resampled independently,
``--resamples``):
  * pooled expression error of expr_adapter <= 0.5x arc2face's with the interval's top <= 0.6, over the components
    the toy SMIRK reads on decoded faces (MAE on VAE round trips of held-out faces at most half the mean
    predictor's in metrics.json: on the others every method gets the annotator's own error);
  * ID similarity of expr_adapter >= 0.9x arc2face's;
  * expr_ref's background L1 to the reference below expr_adapter's: the interval's top < 1 (the Reference
    Adapter keeps appearance).
Negative controls on the same pairs (``--no-controls`` skips them): the trained Expression Adapter at scale 0 and an
untrained one at the run's scale must both miss the expression goal, or meeting it proves nothing.
The ceiling (``CEILING``, a folder method on the same pairs, in calibrations too): each target's own face passed
through the toy VAE, the image a generator that copied the requested expression perfectly would make at best; its
expression error over Arc2Face's is how low the goal's ratio can go as the toy SMIRK reads decoded faces.
Prints the table, each readable component's error and target/read correlation per method, and writes all of it to
``<out>/closed_loop.json`` (``closed_loop_val.json`` on ``val``, ``_negmean`` with ``--negative-expression mean``,
``_g<G>`` with ``--guidance G`` other than the official 3);
with ``--check`` exits 1 when a goal is missed or a negative control meets the expression goal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import chain, groupby
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from PIL import Image

from blendexp.config import CONF_DIR
from blendexp.data.datamodule import tar_members
from blendexp.data.image_sets import InputImage, Skipped, read_images
from blendexp.eval.metrics import cell_totals, two_way_ratio
from blendexp.models.reference_adapter import DEMO_GUIDANCE
from blendexp.toyworld.assets import decoded

REPO = Path(__file__).resolve().parent.parent
EXPR_GOAL, EXPR_HIGH, ID_GOAL = 0.5, 0.6, 0.9  # ratio goals; EXPR_HIGH: its interval's top
SPLITS = ("val", "test")  # halves of the held-out stills' subjects: val chooses, test reports
SCALE_GRID = (1.0, 1.5, 2.0, 2.5, 3.0)  # --calibrate's default scales
CEILING = "target_roundtrip"  # each target's own face through the toy VAE: a perfect expression copy at best
CALIBRATE = "python benchmarks/closed_loop.py --split val --calibrate, with this run's flags"

# Negative controls: neither may meet the expression goal, or the goal proves nothing about the trained adapter.
CONTROLS = {"expr_scale0": "the trained Expression Adapter at scale 0 (Arc2Face alone)",
            "expr_untrained": "an untrained Expression Adapter at the run's scale"}
GOALS = [("expr_adapter / arc2face expression error", "expr_ratio", f"<= {EXPR_GOAL}, interval top <= {EXPR_HIGH}",
          "expr_goal_met"),
         ("expr_adapter / arc2face ID similarity", "id_ratio", f">= {ID_GOAL}", "id_goal_met"),
         ("expr_ref / expr_adapter background L1", "bg_l1_ref_vs_expr", "interval top < 1", "ref_goal_met")]


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
    """FLAME components the toy SMIRK reads on decoded faces, as its build measured them on held-out faces (MAE on VAE
    round trips at most ``READABLE`` x the mean predictor's, blendexp.toyworld.annotators: generation is no sharper)."""
    return json.loads(toy["metrics"].read_text())["expression_encoder"]["readable_decoded"]


def digest(items: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 (16 hex digits) of named contents: what a calibration was made with."""
    h = hashlib.sha256()
    for name, data in items:
        h.update(name.encode() + data)
    return h.hexdigest()[:16]


def file_contents(files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """Each file's name and bytes."""
    return ((f.name, f.read_bytes()) for f in files)


def provenance(toy: dict[str, Path], data: Path, negative: str, guidance: float) -> dict[str, object]:
    """What the adapter scale's effect depends on but the adapter, as a calibration records it and a test run checks it
    (before training: a calibration that cannot belong to this run is refused in seconds, not hours)."""
    weights = sorted((toy["models"] / "arc2face").glob("*.safetensors")) + sorted(
        (toy["models"] / "encoder").glob("*.safetensors"))
    return {"split": "val", "base": digest(file_contents(weights)),
            "data": digest(chain.from_iterable(map(tar_members, sorted((data / "shards").glob("val-*.tar"))))),
            "negative_expression": negative, "guidance": guidance}


def adapter_digest(expr: Path) -> str:
    """The trained Expression Adapter's exported bytes: the rest of what a calibration was made with."""
    return digest(file_contents(sorted(p for p in (expr / "export").rglob("*") if p.is_file())))


def split_inputs(shards: str, split: str, sources: int | None, targets: int | None) -> list[str]:
    """Evaluation overrides that select ``split``: its sources are one face per subject and its targets the
    expressions of all its faces (or the first ``sources`` / ``targets`` of them)."""
    skipped: list[Skipped] = []
    subjects = [item.subject for item in read_images(shards, "held-out stills", skipped)]
    runs = [(s, len(list(g))) for s, g in groupby(subjects)]
    if len(runs) != len(set(subjects)) or len(runs) < 2:
        sys.exit(f"closed loop: {shards} must hold at least 2 subjects, each subject's faces together (as "
                 f"blendexp.toyworld.shards writes them); found {len(runs)} runs of {len(set(subjects))} subjects")
    half = len(runs) // 2
    before, chosen = (runs[:0], runs[:half]) if split == "val" else (runs[:half], runs[half:])
    faces = sum(n for _, n in chosen)
    for what, n, have in (("sources", sources, len(chosen)), ("targets", targets, faces)):
        if n is not None and n > have:
            sys.exit(f"closed loop: --{what} {n}, but the {split} split has {have} ({len(chosen)} subjects, "
                     f"{faces} faces of {shards})")
    return [f"eval.sources.path={shards}", "eval.sources.per_subject=1", f"eval.sources.offset={len(before)}",
            f"eval.sources.limit={sources or len(chosen)}", f"eval.targets.path={shards}",
            "eval.targets.per_subject=null", f"eval.targets.offset={sum(n for _, n in before)}",
            f"eval.targets.limit={targets or faces}"]


def split_faces(inputs: list[str]) -> tuple[list[InputImage], list[InputImage]]:
    """The source and target faces that ``split_inputs``' overrides select, read as evaluate reads them."""
    args = dict(arg.split("=", 1) for arg in inputs)
    picks = {}
    for role in ("sources", "targets"):
        per = args[f"eval.{role}.per_subject"]
        picks[role] = read_images(args[f"eval.{role}.path"], role[:-1], [], int(args[f"eval.{role}.limit"]),
                                  int(args[f"eval.{role}.offset"]), None if per == "null" else int(per))
    return picks["sources"], picks["targets"]


def target_round_trips(inputs: list[str], toy: dict[str, Path], folder: Path, size: int, samples: int) -> Path:
    """Write each target's face through the toy VAE (as the build's readability measure makes decoded faces) as every
    source's image of it (``CEILING``'s folder)."""
    sources, targets = split_faces(inputs)
    (faces,) = decoded(toy["sd15"] / "vae", ([t.image for t in targets],), size)
    for source in sources:
        (folder / source.name).mkdir(parents=True, exist_ok=True)
        for target, face in zip(targets, faces):
            for k in range(samples):
                Image.fromarray(face).save(folder / source.name / f"{target.name}_{k}.png")
    return folder


def ceiling_method(folder: Path) -> list[str]:
    """Evaluation overrides adding ``CEILING``, read from ``folder``."""
    return [f"+eval.methods.{CEILING}.kind=folder", f"+eval.methods.{CEILING}.path={folder}"]


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


def run_dir(out: Path, experiment: str) -> Path:
    """Where the benchmark trains one adapter."""
    return out / experiment / "closed_loop"


def train_overrides(experiment: str, out: Path, toy: dict[str, Path], data: Path, steps: int | None,
                    a: argparse.Namespace, *overrides: str) -> list[str]:
    """Every override of one adapter's training run, the user's (``--expr-overrides``, ``--ref-overrides``) last."""
    settings = ["trainer=gpu"] if a.device.startswith("cuda") else []
    settings += [f"trainer.max_steps={steps}"] if steps else []
    settings += [f"data.batch_size={a.batch_size}"] if a.batch_size else []
    return [f"+experiment={experiment}", "run_name=closed_loop", f"paths.outputs={out}", f"seed={a.seed}",
            *base_overrides(toy), "model.base.tiny_root=null", f"data.val_shards={data}/shards/val-*.tar",
            "callbacks.samples.every_n_steps=0", *settings, *overrides]


def check_composes(runs: dict[str, list[str]]) -> None:
    """Compose each training run's config before any of them trains, so that a mistyped override is refused in
    seconds rather than after the Expression Adapter's hour of training."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for flag, overrides in runs.items():
            try:
                compose("train", overrides=overrides)
            except HydraException as err:
                sys.exit(f"closed loop: the {flag} run's config does not compose, nothing was trained: {err}")


def train(experiment: str, out: Path, overrides: list[str]) -> Path:
    """One adapter's run folder, trained now unless a finished export is already there."""
    folder = run_dir(out, experiment)
    if (folder / "export").is_dir() and any((folder / "export").iterdir()):
        print(f"reusing {folder}")
        return folder
    run("blendexp.train", *overrides)
    return folder


def mean_expression(shards: str, path: Path) -> Path:
    """Write the mean FLAME vector of the training shards (the negative expression ``--negative-expression mean``)."""
    skipped: list[Skipped] = []
    exps = [item.exp for item in read_images(shards, "training expression", skipped)]
    if skipped:
        print(f"mean expression: skipped {len(skipped)} unreadable shard members of {shards}")
    np.save(path, np.mean(exps, axis=0).astype(np.float32))
    return path


def scale_method(scale: float) -> str:
    """The calibration's name for the Expression Adapter at one scale (a Hydra key: no dots)."""
    return f"expr_scale{scale:g}".replace(".", "p")


def run_methods(expr: Path, ref: Path, scale: float, negative: list[str]) -> list[str]:
    """Evaluation overrides of a run's three methods, both adapters at ``scale``."""
    return [f"eval.methods.expr_adapter.adapter={expr}", f"eval.methods.expr_ref.ref_adapter={ref}",
            f"eval.methods.expr_ref.exp_adapter={expr}",
            *(f"eval.methods.{m}.{k}" for m in ("expr_adapter", "expr_ref") for k in (f"scale={scale}", *negative))]


def control_methods(expr: Path, scale: float, negative: list[str]) -> list[str]:
    """Evaluation overrides of the negative controls (``CONTROLS``), on the same pairs and seeds as the methods."""
    settings = {"expr_scale0": (f"adapter={expr}", "scale=0"), "expr_untrained": ("adapter=null", f"scale={scale}")}
    return [f"+eval.methods.{m}.{k}" for m, ks in settings.items() for k in ("kind=expr_adapter", *ks, *negative)]


def calibration_methods(expr: Path, scales: list[float], negative: list[str]) -> list[str]:
    """Evaluation overrides of a calibration: Arc2Face and the Expression Adapter at every scale, in one evaluation
    (Arc2Face's images are made once)."""
    return ["~eval.methods.expr_adapter", "~eval.methods.expr_ref",
            *(f"+eval.methods.{scale_method(s)}.{k}" for s in scales
              for k in ("kind=expr_adapter", f"adapter={expr}", f"scale={s}", *negative))]


def evaluate(name: str, out: Path, toy: dict[str, Path], data: Path, method_overrides: list[str],
             a: argparse.Namespace) -> Path:
    """The methods and ``CEILING`` on the split's held-out faces, scored by the toy annotators; the report folder."""
    inputs = split_inputs(f"{data}/shards/val-*.tar", a.split, a.sources, a.targets)
    copies = target_round_trips(inputs, toy, out / "evaluate" / f"{CEILING}_{a.split}", a.size, a.samples)
    run("blendexp.evaluate", f"run_name={name}", f"paths.outputs={out}", f"device={a.device}", f"seed={a.seed}",
        *base_overrides(toy), "eval.base.tiny_root=null",
        *inputs, f"eval.generation.size={a.size}", f"eval.generation.steps={a.gen_steps}",
        f"eval.generation.guidance={a.guidance}", f"eval.generation.samples={a.samples}", *method_overrides,
        *ceiling_method(copies),
        "eval.annotators.tiny_root=null", "eval.annotators.facenet=null", "eval.annotators.generated=aligned",  # toy
        f"eval.annotators.arcface={toy['arcface']}", f"eval.annotators.smirk={toy['smirk']}")
    return out / "evaluate" / name


def cells(frame: pd.DataFrame, sources: dict[str, int], targets: dict[str, int], value: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """Per (source, target) pair: sum and count of one per-image value (the two-way bootstrap's input)."""
    return cell_totals(frame[value].to_numpy(float), frame["source"].map(sources).to_numpy(),
                       frame["target"].map(targets).to_numpy(), (len(sources), len(targets)))


class Report:
    """One evaluation's per-image scores, with the pooled error over the readable components per image."""

    def __init__(self, folder: Path, readable: list[str], resamples: int, seed: int) -> None:
        self.images = pd.read_csv(folder / "per_image.csv")
        self.readings = pd.read_csv(folder / "expression_per_image.csv").copy()  # one block, not one per column
        self.errors = pd.DataFrame({c: (self.readings[f"read.{c}"] - self.readings[f"target.{c}"]).abs()
                                    for c in readable})
        self.readings = self.readings.assign(exp_mae_readable=self.errors.mean(axis=1))
        self.rows = {r["method"]: r for r in pd.read_csv(folder / "results.csv").to_dict("records")}
        self.sources = {s: i for i, s in enumerate(sorted(self.images["source"].unique()))}
        self.targets = {t: i for i, t in enumerate(sorted(self.images["target"].unique()))}
        self.readable, self.resamples, self.seed = readable, resamples, seed

    def ratio(self, value: str, ours: str, theirs: str) -> dict[str, float]:
        """``ours`` / ``theirs`` mean of a per-image value with its two-way bootstrap 95% interval."""
        frame = self.readings if value == "exp_mae_readable" else self.images
        est = two_way_ratio(cells(frame[frame["method"] == ours], self.sources, self.targets, value),
                            cells(frame[frame["method"] == theirs], self.sources, self.targets, value),
                            self.resamples, self.seed)
        return {"ratio": est.mean, "low": est.low, "high": est.high}

    def methods(self) -> dict[str, dict[str, float]]:
        """Each method's pooled readable and all-55 expression error, ID similarity and background L1."""
        return {m: {"exp_mae_readable": float(self.readings.loc[self.readings["method"] == m,
                                                                 "exp_mae_readable"].mean()),
                    "exp_mae": float(r["exp_mae"]), "id_sim": float(r["id_sim"]), "bg_l1": float(r["bg_l1"])}
                for m, r in self.rows.items()}

    def components(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per readable component and method: its error and the target/read correlation."""
        return {c: {m: {"mae": float(self.errors.loc[g.index, c].mean()),
                        "corr": float(np.corrcoef(g[f"target.{c}"], g[f"read.{c}"])[0, 1])}
                    for m, g in self.readings.groupby("method")} for c in self.readable}


def meets_expr_goal(ci: dict[str, float]) -> bool:
    """An expression-error ratio meets the goal: its estimate and its interval's top under the goal's lines."""
    return ci["ratio"] <= EXPR_GOAL and ci["high"] <= EXPR_HIGH


def summarise(report: Report) -> dict[str, object]:
    """Per-method scores, per readable component error and correlation, the three ratios with two-way bootstrap 95%
    intervals, and whether each goal is met."""
    methods = report.methods()
    expr = report.ratio("exp_mae_readable", "expr_adapter", "arc2face")
    ident = report.ratio("id_sim", "expr_adapter", "arc2face")
    bg = report.ratio("bg_l1", "expr_ref", "expr_adapter")
    return {"readable_components": report.readable, "methods": methods, "components": report.components(),
            "intervals": {"expr_ratio": expr, "id_ratio": ident, "bg_l1_ref_vs_expr": bg,
                          "resamples": report.resamples,
                          "over": "sources and targets, each resampled with replacement"},
            "expr_ratio": expr["ratio"], "expr_goal_met": meets_expr_goal(expr),
            "id_ratio": ident["ratio"],
            "id_goal_met": bool(methods["arc2face"]["id_sim"] > 0 and ident["ratio"] >= ID_GOAL),
            "bg_l1_ref_vs_expr": bg["ratio"], "ref_goal_met": bg["high"] < 1, **control_results(report),
            "ceiling": ceiling(report)}


def ceiling(report: Report) -> dict[str, object]:
    """``CEILING``'s expression error over Arc2Face's, with its interval: the lowest ratio a perfect copy reaches."""
    return {"method": CEILING, "expr_ratio": report.ratio("exp_mae_readable", CEILING, "arc2face")}


def control_results(report: Report) -> dict[str, object]:
    """Each negative control's expression error over Arc2Face's (with its interval), and whether all of them miss the
    expression goal (``None`` when the run evaluated none)."""
    ratios = {m: report.ratio("exp_mae_readable", m, "arc2face") for m in CONTROLS if m in report.rows}
    return {"controls": ratios,
            "controls_miss_goal": not any(map(meets_expr_goal, ratios.values())) if ratios else None}


def calibrate(report: Report, scales: list[float], made_with: dict[str, object]) -> dict[str, object]:
    """The scale with the lowest expression error among those that keep identity (ID ratio >= ID_GOAL; if none
    does, the one that keeps it best), with every scale's ratios."""
    sweep = {f"{s:g}": {"expr_ratio": report.ratio("exp_mae_readable", scale_method(s), "arc2face"),
                        "id_ratio": report.ratio("id_sim", scale_method(s), "arc2face")} for s in scales}
    keep = [s for s in scales if sweep[f"{s:g}"]["id_ratio"]["ratio"] >= ID_GOAL]
    chosen = (min(keep, key=lambda s: sweep[f"{s:g}"]["expr_ratio"]["ratio"]) if keep
              else max(scales, key=lambda s: sweep[f"{s:g}"]["id_ratio"]["ratio"]))
    return {**made_with, "expr_scale": chosen, "sources": len(report.sources), "targets": len(report.targets),
            "ceiling": ceiling(report),
            "rule": f"lowest pooled readable expression error among scales with ID ratio >= {ID_GOAL}"
                    + ("" if keep else " (none kept it: the highest ID ratio)"), "scales": sweep}


def calibrated_scale(path: Path, made_with: dict[str, object]) -> tuple[float, dict[str, object]]:
    """The scale a validation calibration chose, refused when it was made with another split, base, adapter, data,
    negative expression or guidance scale than this run's."""
    if not path.is_file():
        sys.exit(f"closed loop: no calibration at {path}; choose the adapter scale on the validation split first "
                 f"({CALIBRATE}) or give --expr-scale")
    cal = json.loads(path.read_text())
    wrong = [f"{k}: made with {cal.get(k)!r}, this run has {v!r}" for k, v in made_with.items() if cal.get(k) != v]
    if wrong:
        sys.exit(f"closed loop: the calibration {path} does not belong to this run ({'; '.join(wrong)}); "
                 f"calibrate again ({CALIBRATE})")
    return float(cal["expr_scale"]), cal


def ceiling_line(ceil: dict[str, object]) -> str:
    """How low the expression ratio can go: ``CEILING``'s, with its interval."""
    ci = ceil["expr_ratio"]
    return (f"ceiling: {CEILING} / arc2face expression error (each target's own face through the VAE) "
            f"{ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]")


def print_result(result: dict[str, object]) -> None:
    """The table, each readable component's error and correlation, and each goal with its interval."""
    print(f"split {result['split']}, Expression Adapter scale {result['expr_scale']:g} ({result['scale_from']})")
    print(f"readable components: {', '.join(result['readable_components'])}")
    print(f"{'method':<14}{'expr MAE (readable)':>21}{'expr MAE (all)':>16}{'ID sim':>9}{'bg L1 to ref':>14}")
    for m, v in result["methods"].items():
        print(f"{m:<14}{v['exp_mae_readable']:>21.4f}{v['exp_mae']:>16.4f}{v['id_sim']:>9.3f}{v['bg_l1']:>14.4f}")
    for c, per in result["components"].items():
        print(f"{c}: " + ", ".join(f"{m} MAE {v['mae']:.4f} r {v['corr']:.2f}" for m, v in per.items()))
    for label, key, goal, met in GOALS:
        ci = result["intervals"][key]
        print(f"{label}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] "
              f"(goal {goal}: {'met' if result[met] else 'NOT met'})")
    print(ceiling_line(result["ceiling"]))
    for m, ci in result["controls"].items():
        verdict = "MEETS it: the expression goal proves nothing" if meets_expr_goal(ci) else "misses it, as it must"
        print(f"negative control {m} / arc2face expression error ({CONTROLS[m]}): {ci['ratio']:.3f} "
              f"[{ci['low']:.3f}, {ci['high']:.3f}] ({verdict})")


def parse_args() -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", type=Path, default=REPO / "data" / "toy",
                   help="the models: the copy the repository ships (default), or a build root of python -m "
                        "blendexp.toyworld.assets --root ...")
    p.add_argument("--data", type=Path, default=REPO / ".cache" / "toy",
                   help="where shards/ and clips/ are: a build root, or python -m blendexp.toyworld.assets "
                        "--data-only --root ... for the shipped models (default .cache/toy)")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "closed_loop")
    p.add_argument("--split", choices=SPLITS, default="test",
                   help="val: the first half of the held-out stills' subjects, where every choice is made; test: the "
                        "second half, reported only")
    p.add_argument("--calibrate", type=float, nargs="*", metavar="SCALE",
                   help=f"(--split val only) evaluate the Expression Adapter at these scales (default "
                        f"{' '.join(f'{s:g}' for s in SCALE_GRID)}) and write the chosen one to --calibration")
    p.add_argument("--calibration", type=Path, default=None,
                   help="the calibration file (default <out>/calibration.json): written by --calibrate, read by test")
    p.add_argument("--expr-scale", type=float, default=None,
                   help="the Expression Adapter's scale at evaluation, in both methods that carry it (default: the "
                        "calibration's; on val without a calibration: 1)")
    p.add_argument("--expr-experiment", default="closed_loop_expr",
                   help="the Expression Adapter's experiment overlay (its recipe; expr_adapter: the plain one)")
    p.add_argument("--ref-experiment", default="closed_loop_ref", help="the Reference Adapter's experiment overlay")
    p.add_argument("--expr-steps", type=int, default=None, help="Expression Adapter steps (default: the overlay's)")
    p.add_argument("--ref-steps", type=int, default=None, help="Reference Adapter steps (default: the overlay's)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the overlays')")
    p.add_argument("--expr-overrides", nargs="*", default=[],
                   help="more Hydra overrides of the Expression Adapter run, each its own argument (a=1 b=2)")
    p.add_argument("--ref-overrides", nargs="*", default=[],
                   help="more Hydra overrides of the Reference Adapter run, each its own argument (a=1 b=2)")
    p.add_argument("--negative-expression", choices=("zeros", "mean"), default="zeros",
                   help="the FLAME vector classifier-free guidance pushes away from: zeros (as adapters are "
                        "trained) or the training shards' mean expression")
    p.add_argument("--sources", type=int, default=None, help="source faces (default: one per subject of the split)")
    p.add_argument("--targets", type=int, default=None,
                   help="target expressions: the split's first N faces (default: all of them)")
    p.add_argument("--samples", type=int, default=1, help="seeds per (source, target) pair")
    p.add_argument("--gen-steps", type=int, default=20, help="sampling steps")
    p.add_argument("--guidance", type=float, default=DEMO_GUIDANCE,
                   help=f"classifier-free guidance scale of every method (default {DEMO_GUIDANCE:g}, the official "
                        "Arc2Face's); a calibration records it and a test run must use the same")
    p.add_argument("--size", type=int, default=64, help="image size (the toy shards' size)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of both trainings and of the evaluation's samples")
    p.add_argument("--resamples", type=int, default=2000, help="two-way bootstrap resamples of the intervals")
    p.add_argument("--controls", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the negative controls (the adapter at scale 0, an untrained adapter) on the "
                        "same pairs; each must miss the expression goal")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed or a negative control meets "
                                                        "the expression goal")
    a = p.parse_args()
    if a.calibrate is not None and a.split != "val":
        p.error("--calibrate chooses on the validation split only: add --split val (the test split is never used "
                "to choose)")
    return a


def main() -> None:
    """Check the assets, train or reuse both adapters, calibrate or evaluate, print and save the results."""
    a = parse_args()
    toy, out = toy_layout(a.toy.resolve()), a.out.resolve()
    data = a.data.resolve()
    missing = missing_assets(toy, data)
    if missing:
        make = "--data-only " if (a.toy / "models" / "arc2face").is_dir() else ""  # the shipped models' data
        sys.exit("closed loop: toy-world assets missing:\n  " + "\n  ".join(missing) + "\nMake them first: "
                 f"python -m blendexp.toyworld.assets {make}--root {a.data}")
    calibration = (a.calibration or out / "calibration.json").resolve()
    expr_dir = run_dir(out, a.expr_experiment)
    runs = {"--expr-overrides": train_overrides(a.expr_experiment, out, toy, data, a.expr_steps, a,
                                                f"data.sources.stills.shards={data}/shards/train-*.tar",
                                                *a.expr_overrides)}
    if a.calibrate is None:  # a calibration trains no Reference Adapter; this one pairs frames within a clip
        runs["--ref-overrides"] = train_overrides(a.ref_experiment, out, toy, data, a.ref_steps, a,
                                                  f"data.sources.stills.shards={data}/clips/clips-*.tar",
                                                  f"model.expression_adapter={expr_dir}", *a.ref_overrides)
    check_composes(runs)
    made_with = provenance(toy, data, a.negative_expression, a.guidance)
    reads_calibration = a.calibrate is None and a.expr_scale is None and (a.split == "test" or calibration.is_file())
    if reads_calibration:
        calibrated_scale(calibration, made_with)  # all but the adapter, before training
    expr = train(a.expr_experiment, out, runs["--expr-overrides"])
    made_with["expr_adapter"] = adapter_digest(expr)
    negative = [] if a.negative_expression == "zeros" else [  # a method setting
        f"negative_expression={mean_expression(f'{data}/shards/train-*.tar', out / 'train_mean_expression.npy')}"]
    suffix = ("_negmean" if negative else "") + ("" if a.guidance == DEMO_GUIDANCE else f"_g{a.guidance:g}")
    readable = readable_components(toy)
    if a.calibrate is not None:
        scales = a.calibrate or list(SCALE_GRID)
        folder = evaluate(f"val_calibration{suffix}", out, toy, data, calibration_methods(expr, scales, negative), a)
        cal = calibrate(Report(folder, readable, a.resamples, a.seed), scales, made_with)
        calibration.parent.mkdir(parents=True, exist_ok=True)
        calibration.write_text(json.dumps(cal, indent=1) + "\n")
        for s, v in cal["scales"].items():
            print(f"scale {s}: expression error {v['expr_ratio']['ratio']:.3f}x, ID {v['id_ratio']['ratio']:.3f}x "
                  "Arc2Face's")
        print(ceiling_line(cal["ceiling"]))
        print(f"chosen on val: scale {cal['expr_scale']:g} ({cal['rule']}) -> {calibration}")
        return
    ref = train(a.ref_experiment, out, runs["--ref-overrides"])
    if reads_calibration:
        scale, cal = calibrated_scale(calibration, made_with)
        scale_from = f"calibration on val: {calibration}"
    elif a.expr_scale is not None:
        scale, scale_from, cal = a.expr_scale, "--expr-scale", None
    else:
        scale, scale_from, cal = 1.0, "untuned default on val (no calibration yet)", None
    name = f"closed_loop_{a.split}_scale{scale:g}{suffix}"  # a generation cache per split and scale
    controls = control_methods(expr, scale, negative) if a.controls else []
    folder = evaluate(name, out, toy, data, [*run_methods(expr, ref, scale, negative), *controls], a)
    result = {"split": a.split, "expr_scale": scale, "scale_from": scale_from, "calibration": cal,
              "negative_expression": a.negative_expression, "guidance": a.guidance, "seed": a.seed,
              **summarise(Report(folder, readable, a.resamples, a.seed))}
    path = out / f"closed_loop{'' if a.split == 'test' else '_val'}{suffix}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_result(result)
    print(f"written: {path}")
    if a.check and not (all(result[key] for *_, key in GOALS) and result["controls_miss_goal"] is not False):
        sys.exit(1)


if __name__ == "__main__":
    main()
