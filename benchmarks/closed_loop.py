"""Closed-loop check in the toy world: does a trained Expression Adapter produce the expression it is asked for?

    python benchmarks/closed_loop.py [--toy .cache/toy] [--steps 300] [--device cpu]

The toy world knows every face's identity and expression, and its trained annotators read them back. ``--toy`` is
the root ``python -m blendexp.toyworld.assets`` builds: the trained toy Arc2Face base (``base/``), its shards
(``shards/``) and the toy ArcFace ONNX and SMIRK checkpoint in the official layout
(``annotators/antelopev2/arcface.onnx``, ``annotators/smirk/SMIRK_em1.pt``). The benchmark trains an Expression
Adapter on that base and those shards (or reuses the one a previous run left in ``<out>/expr_adapter/closed_loop``),
evaluates it and Arc2Face alone on held-out toy faces ×
the expressions of held-out toy images with those annotators, and prints the ratio of their expression errors
(expr_adapter / arc2face, both measured in this run; goal <= 0.80) with both identity similarities.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.80


def missing_assets(toy: Path) -> list[str]:
    """Every toy-world file the check needs that is not there."""
    need = [toy / "annotators/antelopev2/arcface.onnx", toy / "annotators/smirk/SMIRK_em1.pt",
            toy / "base/models/arc2face/config.json", toy / "base/stable-diffusion-v1-5/vae/config.json"]
    missing = [str(p) for p in need if not p.is_file()]
    missing += [str(toy / "shards" / f"{split}-*.tar") for split in ("train", "val")
                if not any((toy / "shards").glob(f"{split}-*.tar"))]
    return missing


def base_overrides(toy: Path) -> list[str]:
    """Point an entry point at the trained toy base instead of the tiny random one."""
    return [f"paths.models={toy}/base/models", f"paths.sd15={toy}/base/stable-diffusion-v1-5"]


def run(module: str, *overrides: str) -> None:
    """Run an entry point as a user would; stop with its output when it fails."""
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.exit(f"{module} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def train_adapter(out: Path, toy: Path, steps: int, device: str) -> Path:
    """The closed-loop adapter run folder, trained now unless a finished one is already there."""
    run_dir = out / "expr_adapter" / "closed_loop"
    if (run_dir / "export" / "exp_adapter.safetensors").is_file():
        print(f"reusing the adapter in {run_dir}")
        return run_dir
    trainer = ["trainer=gpu"] if device.startswith("cuda") else []
    shards = toy / "shards"
    run("blendexp.train", "+experiment=expr_adapter", "run_name=closed_loop", f"paths.outputs={out}",
        *base_overrides(toy), "model.base.tiny_root=null",
        f"data.sources.stills.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
        f"trainer.max_steps={steps}", *trainer)
    return run_dir


def evaluate(out: Path, toy: Path, adapter: Path, device: str, size: int) -> dict[str, dict[str, str]]:
    """Arc2Face vs the trained adapter on held-out toy faces, scored by the toy annotators; rows of results.csv."""
    shards, assets = toy / "shards", toy / "annotators"
    run("blendexp.evaluate", "run_name=closed_loop", f"paths.outputs={out}", f"device={device}",
        *base_overrides(toy), "eval.base.tiny_root=null",
        f"eval.sources.path={shards}/val-*.tar", "eval.sources.limit=8",
        f"eval.targets.path={shards}/val-*.tar", "eval.targets.per_subject=null", "eval.targets.offset=0",
        "eval.targets.limit=8",
        f"eval.generation.size={size}", "eval.generation.steps=20", "eval.generation.samples=2",
        "~eval.methods.expr_ref", f"eval.methods.expr_adapter.adapter={adapter}",
        "eval.annotators.tiny_root=null", "eval.annotators.facenet=null",
        f"eval.annotators.arcface={assets}/antelopev2/arcface.onnx", f"eval.annotators.smirk={assets}/smirk/SMIRK_em1.pt")
    with open(out / "evaluate" / "closed_loop" / "results.csv") as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def main() -> None:
    """Check the assets, train or reuse, evaluate, print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toy", type=Path, default=REPO / ".cache" / "toy",
                   help="root of the built toy assets (python -m blendexp.toyworld.assets --root ...)")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "closed_loop")
    p.add_argument("--steps", type=int, default=300, help="training steps when no trained adapter is there yet")
    p.add_argument("--size", type=int, default=64, help="image size (the toy shards' size)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    missing = missing_assets(a.toy)
    if missing:
        sys.exit("closed loop: toy-world assets missing:\n  " + "\n  ".join(missing) + "\nBuild them first: "
                 f"python -m blendexp.toyworld.assets --root {a.toy}")
    adapter = train_adapter(a.out, a.toy, a.steps, a.device)
    rows = evaluate(a.out, a.toy, adapter, a.device, a.size)
    base, ours = rows["arc2face"], rows["expr_adapter"]
    ratio = float(ours["exp_mae"]) / float(base["exp_mae"])
    print(f"expression MAE: expr_adapter {float(ours['exp_mae']):.4f} vs arc2face {float(base['exp_mae']):.4f}")
    print(f"ID similarity (toy ArcFace): expr_adapter {float(ours['id_sim']):.3f} vs arc2face {float(base['id_sim']):.3f}")
    print(f"ratio expr_adapter / arc2face expression MAE: {ratio:.3f} (goal <= {GOAL:.2f}: "
          f"{'met' if ratio <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
