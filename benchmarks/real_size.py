"""Arc2Face at its real size on CPU: every recipe end to end, its cost, and a memory model projected to GPUs.

    python benchmarks/real_size.py [--root DIR] [--sizes 256 512] [--recipes ...] [--quick] [--out FILE] [--report]

The base is the full-size random Arc2Face of ``blendexp.models.full_size`` (SD 1.5 UNet and VAE, CLIP ViT-L/14 text
encoder), written to ``--root`` when it is not there yet. For each recipe (``+experiment=expr_adapter``,
``ref_adapter``, ``arc2face_base``) and image size, with batch 1:

* the user's path: ``python -m blendexp.train`` runs a step and saves a checkpoint, the same command with
  ``ckpt_path=last`` resumes to step 2 and exports, and the export loads in a plain diffusers
  ``StableDiffusionPipeline`` exactly as the official demo loads adapters (``scripts/official_release_check.py``)
  and generates with 2 sampling steps at the trained size;
* measurements, in one fresh process per setting (without and with ``model.gradient_checkpointing``): trained and
  frozen parameters, seconds per float32 training step (the module's loss, backward and AdamW on the DataModule's
  batches of the shipped sample shards, resized) and the process's peak RSS; then the memory model: the weights
  (all of them), gradients and AdamW state are counted from the module and its optimizer, and torch's profiler
  (``profile_memory``, its memory timeline by category) gives the highest transient memory (activations,
  temporaries, autograd buffers) of one forward and backward at batch 1 and at batch 2, with every condition
  present, and of one optimizer step. peak(B) = persistent + max(transient(1) + (B - 1) x per-sample, optimizer
  step's transient). The bf16-mixed projection
  (``trainer=gpu``) re-expresses it by a stated rule, since bf16 convolutions take minutes on CPUs without bf16
  units: weights, gradients, AdamW state and its step stay float32, forward and backward transients take half,
  plus autocast's bf16 copy of the trained weights. Projected GPU memory per batch size and the largest batch that
  fits 24, 40 and 80 GiB follow. A projection, not a GPU measurement: the CUDA context, cuDNN workspaces and allocator
  fragmentation are not in it.

Results go to ``--out`` (default ``benchmarks/results/real_size-<date>.json``) after every finished setting; a
rerun with the same ``--out`` keeps finished settings and does the rest. A full run also copies them to
``blendexp/memory_model.json``, from which a real-size training run on a GPU prints its projection (``--report``
does only that and prints the tables, e.g. after a run stopped part-way). ``--quick``
(the test): 128 px, no gradient-checkpointing runs, the first step's time, the user's path for the first recipe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from blendexp.memory_model import GIB, SHIPPED, largest_batch, project, setting_key

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("expr_adapter", "ref_adapter", "arc2face_base")
CAPACITIES_GIB = (24, 40, 80)
PROJECTED_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# torch.profiler's memory timeline categories, in its order; the persistent ones are counted from the module
CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient", "autograd_detail",
              "unknown")
PERSISTENT = ("parameter", "optimizer_state", "gradient")


def base_overrides(root: Path) -> list[str]:
    """Point a run at the full-size base in ``root``."""
    return [f"paths.models={root / 'models'}", f"paths.sd15={root / 'stable-diffusion-v1-5'}"]


# ------------------------------------------------------------------------------------------- measurement worker
def first(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first ``n`` rows of a batch."""
    return {k: v[:n] for k, v in batch.items()}


def measure(recipe: str, size: int, checkpointing: bool, root: Path, steps: int) -> dict[str, Any]:
    """Parameters, float32 step time, peak RSS and the memory peaks at batch 1 and 2 of one setting."""
    import lightning as L
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from torch.profiler import ProfilerActivity, profile

    from blendexp.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={recipe}", *base_overrides(root), f"data.image_size={size}",
                                          "data.batch_size=2", "data.num_workers=0",
                                          f"model.gradient_checkpointing={checkpointing}"])
    L.seed_everything(cfg.seed)
    datamodule, model = instantiate(cfg.data), instantiate(cfg.model)
    datamodule.setup("fit")
    model.train()
    batch = next(iter(datamodule.train_dataloader()))
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.model.optim
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))

    def forward_backward(n: int) -> None:
        """The module's loss on the first ``n`` rows and its gradients (kept allocated, as between steps)."""
        opt.zero_grad(set_to_none=False)
        model.forward_loss(first(batch, n)).backward()

    seconds = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state (untimed unless steps=0)
        start = time.perf_counter()
        forward_backward(1)
        opt.step()
        seconds.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model.dropout_cfg = {}  # every condition present: the reference UNet runs in every measured step

    def transient_peak(work: Any) -> dict[str, int]:
        """Bytes by the profiler's category at the highest point of ``work()``, less weights, grads and state."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            work()
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
            _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())
        by_category = [dict(zip(CATEGORIES, row[1:])) for row in sizes]
        return max(({k: v for k, v in row.items() if k not in PERSISTENT} for row in by_category),
                   key=lambda row: sum(row.values()))

    transient = {n: transient_peak(lambda n=n: forward_backward(n)) for n in (1, 2)}
    transient["optimizer"] = transient_peak(opt.step)
    trained = sum(p.numel() for p in params)
    persistent = {"weights": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]),
                  "gradients": sum(p.numel() * p.element_size() for p in params),
                  "optimizer_state": sum(t.numel() * t.element_size() for st in opt.state.values()
                                         for t in st.values() if torch.is_tensor(t))}
    fp32 = {k: sum(v.values()) for k, v in transient.items()}
    bf16 = {**{k: v // 2 for k, v in fp32.items()}, "optimizer": fp32["optimizer"]}  # the module docstring's rule
    bf16_persistent = sum(persistent.values()) + 2 * trained
    return {"recipe": recipe, "size": size, "gradient_checkpointing": checkpointing,
            "trained_parameters": trained, "frozen_parameters": sum(p.numel() for p in model.parameters()) - trained,
            "seconds_per_step_fp32": min(seconds[1:] or seconds), "peak_rss_bytes": peak_rss,
            "persistent_bytes": persistent, "fp32_transient_peak_bytes": transient,
            "model": {"fp32": memory_model(sum(persistent.values()), fp32),
                      "bf16": memory_model(bf16_persistent, bf16)}}


def memory_model(persistent: int, transient: dict[Any, int]) -> dict[str, Any]:
    """peak(B) = persistent + max(transient_1 + (B - 1) x per_sample, optimizer step's transient): the forward and
    backward grow with the batch, the optimizer step does not; projections and the largest batches that fit."""
    per_sample = max(transient[2] - transient[1], 0)
    fit = {"fixed_bytes": persistent + transient[1] - per_sample, "per_sample_bytes": per_sample,
           "floor_bytes": persistent + transient["optimizer"]}
    return {**fit, "projected_gib": {str(b): round(project(fit, b) / GIB, 2) for b in PROJECTED_BATCHES},
            "largest_batch": {str(c): largest_batch(fit, c * GIB) for c in CAPACITIES_GIB}}


# ----------------------------------------------------------------------------------------------- the user's path
def train(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m blendexp.train`` as a user runs it; fails loudly."""
    res = subprocess.run([sys.executable, "-m", "blendexp.train", *args], cwd=REPO, text=True, capture_output=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if res.returncode == -signal.SIGKILL:
        raise RuntimeError(f"killed (SIGKILL: out of memory, most likely): python -m blendexp.train {' '.join(args)}")
    if res.returncode != 0:
        raise RuntimeError(f"exit status {res.returncode}: python -m blendexp.train {' '.join(args)}\n"
                           f"{res.stderr[-3000:]}")
    return res


def user_path(recipe: str, size: int, root: Path, out: Path) -> dict[str, Any]:
    """Train a step, resume to step 2 and export, then load the export in plain diffusers and generate."""
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    from official_release_check import generate

    run = f"{recipe}-{size}"
    common = [f"+experiment={recipe}", *base_overrides(root), f"data.image_size={size}", "data.batch_size=1",
              "data.num_workers=0", "~callbacks.samples", "callbacks.checkpoint.every_n_train_steps=1",
              f"paths.outputs={out}", f"run_name={run}"]
    start = time.perf_counter()
    train([*common, "trainer.max_steps=1"])
    trained = time.perf_counter()
    resumed = train([*common, "trainer.max_steps=2", "ckpt_path=last"])
    if "finished at step 2" not in resumed.stdout:
        raise RuntimeError(f"{run}: the resumed run did not finish at step 2:\n{resumed.stdout[-2000:]}")
    ended = time.perf_counter()
    run_dir = next(out.glob(f"*/{run}"))
    export = run_dir / "export"
    if recipe == "arc2face_base":  # a whole base in the official layout
        models, base_models, sd15 = export / "models", export / "models", export / "stable-diffusion-v1-5"
    else:
        models, base_models, sd15 = export / "models", root / "models", root / "stable-diffusion-v1-5"
    images = generate(models, base_models, sd15, seed=0, size=size)
    finite = all(np.isfinite(v).all() for v in images.values())
    if not finite:
        raise RuntimeError(f"{run}: the export generated non-finite images")
    ckpt = max((p.stat().st_size for p in (run_dir / "checkpoints").glob("*.ckpt")), default=0)
    return {"recipe": recipe, "size": size, "train_1_step_s": round(trained - start, 1),
            "resume_1_step_s": round(ended - trained, 1), "generate_s": round(time.perf_counter() - ended, 1),
            "exported": sorted(str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()),
            "checkpoint_bytes": ckpt, "generated": sorted(images), "finite": finite}


# ------------------------------------------------------------------------------------------------------- driver
def worker(setting: dict[str, Any]) -> dict[str, Any]:
    """One measurement in a fresh process (peak RSS is per process); errors, e.g. out of memory, are recorded."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(setting)]
    res = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        return {**setting, "error": f"exit status {res.returncode}: {res.stderr[-1500:]}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def user_table(results: dict[str, Any]) -> str:
    """Markdown: per recipe and size, the user's path (train, resume, export, plain-diffusers generation) or its error."""
    rows = ["| recipe | px | train 1 step s | resume 1 step s | generate s | exported files | checkpoint GiB |",
            "|---|---|---|---|---|---|---|"]
    for r in results["user_path"].values():
        if "error" in r:
            why = "killed: out of memory, most likely" if "SIGKILL" in r["error"] else r["error"].splitlines()[0][:80]
            rows.append(f"| {r['recipe']} | {r['size']} | failed ({why}) |||||")
            continue
        rows.append(f"| {r['recipe']} | {r['size']} | {r['train_1_step_s']} | {r['resume_1_step_s']} | "
                    f"{r['generate_s']} | {len(r['exported'])} | {r['checkpoint_bytes'] / GIB:.2f} |")
    return "\n".join(rows)


def write_tables(results: dict[str, Any], out: Path) -> None:
    """Store both tables in the results and print them."""
    results["table"], results["user_table"] = table(results), user_table(results)
    out.write_text(json.dumps(results, indent=1))
    print(results["user_table"], results["table"], sep="\n\n")
    print(f"wrote {out}")


def table(results: dict[str, Any]) -> str:
    """Markdown: per recipe, size and checkpointing, the measured CPU figures and the bf16 GPU projection."""
    rows = ["| recipe | px | grad. ckpt | trained / frozen params | s/step (CPU fp32) | peak RSS GiB | "
            "bf16 GiB at B=1 + per sample | largest bf16 batch 24 / 40 / 80 GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results["measured"].values():
        if "error" in r:
            rows.append(f"| {r['recipe']} | {r['size']} | {r['gradient_checkpointing']} | failed: "
                        f"{r['error'].splitlines()[0]} |||||")
            continue
        m = r["model"]["bf16"]
        rows.append(f"| {r['recipe']} | {r['size']} | {r['gradient_checkpointing']} | {r['trained_parameters']:,} / "
                    f"{r['frozen_parameters']:,} | {r['seconds_per_step_fp32']:.2f} | {r['peak_rss_bytes'] / GIB:.1f} "
                    f"| {m['projected_gib']['1']:.2f} + {m['per_sample_bytes'] / GIB:.2f} | "
                    f"{' / '.join(str(m['largest_batch'][str(c)]) for c in CAPACITIES_GIB)} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    """Options of this benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, help="full-size base (written here if missing; default: a temporary folder)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--steps", type=int, default=2, help="timed float32 steps per measurement")
    p.add_argument("--quick", action="store_true", help="128 px, no gradient checkpointing, first step timed, "
                   "user path for the first recipe only")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/real_size-<date>.json)")
    p.add_argument("--report", action="store_true", help="run nothing: print and store the tables of --out's results "
                   "and ship them as blendexp/memory_model.json (e.g. after a run stopped part-way)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main() -> None:
    """Write the base if needed, then every user path and measurement, saving the JSON after each."""
    a = parser().parse_args()
    if a.worker:
        s = json.loads(a.worker)
        print("RESULT " + json.dumps(measure(s["recipe"], s["size"], s["gradient_checkpointing"], Path(s["root"]),
                                             s["steps"])))
        return
    from blendexp.models.full_size import save_full_size_base

    sizes, checkpointing, steps = ([128], [False], 0) if a.quick else (a.sizes, [False, True], a.steps)
    out = a.out or REPO / "benchmarks" / "results" / f"real_size-{datetime.date.today()}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"user_path": {}, "measured": {}}
    if a.report:
        write_tables(results, out)
        shutil.copy(out, SHIPPED)
        return
    results["machine"] = {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        root = a.root or Path(tmp) / "base"
        if not (root / "models" / "arc2face").is_dir():
            save_full_size_base(root)
        for size in sizes:
            for recipe in a.recipes:
                key = f"{recipe}/{size}"
                done = "error" not in results["user_path"].get(key, {"error": "not run"})
                if not done and not (a.quick and recipe != a.recipes[0]):
                    print(f"user path: {key}", flush=True)
                    try:
                        results["user_path"][key] = user_path(recipe, size, root, Path(tmp) / "runs")
                    except RuntimeError as e:  # recorded (e.g. out of memory) and retried by the next run
                        if a.quick:
                            raise
                        results["user_path"][key] = {"recipe": recipe, "size": size, "error": str(e)}
                        print(f"user path {key} failed: {str(e).splitlines()[0]}", flush=True)
                    out.write_text(json.dumps(results, indent=1))
                for gc in checkpointing:
                    mkey = setting_key(recipe, size, gc)
                    if mkey not in results["measured"] or "error" in results["measured"][mkey]:
                        print(f"measuring: {mkey}", flush=True)
                        results["measured"][mkey] = worker({"recipe": recipe, "size": size, "gradient_checkpointing":
                                                            gc, "root": str(root), "steps": steps})
                        out.write_text(json.dumps(results, indent=1))
    write_tables(results, out)
    if not a.quick:  # the fit training runs read (blendexp/memory_model.py)
        shutil.copy(out, SHIPPED)
        print(f"wrote {SHIPPED}")


if __name__ == "__main__":
    main()
