"""Exploration only: continue training a build's expression encoder (ROOT/annotators/smirk/SMIRK_em1.pt) with a second
recipe RECIPE (JSON of ExpressionTraining fields) on the same renders and round trips, and print/write its metrics.
VAE (default ROOT/vae) makes the round trips. Usage: finetune.py RECIPE ROOT OUT.json [VAE]"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
import numpy as np, torch, torch.nn.functional as F
from blendexp.faces.expression import load_smirk
from blendexp.toyworld import annotators as A, assets
from blendexp.toyworld.fitting import fit
torch.set_num_threads(2)
recipe = json.loads(sys.argv[1]); root = Path(sys.argv[2]); out = Path(sys.argv[3])
cfg = replace(assets.FULL.expression, **recipe)
train, held = assets.load_renders(root, "train"), assets.load_renders(root, "heldout")
vae = Path(sys.argv[4]) if len(sys.argv) > 4 else root / "vae"
train_dec, held_dec = assets.decoded(vae, (train["images"], held["images"]), assets.FULL.image_size)
model = load_smirk(root / assets.SMIRK).to(memory_format=torch.channels_last).train()
rng = np.random.default_rng(1); scale = torch.from_numpy(A.LOSS_SCALE); t = time.perf_counter()
def step():
    idx = rng.integers(len(train["images"]), size=cfg.batch_size)
    x = A.smirk_inputs(A._degrade(train["images"][idx], train_dec[idx], rng, cfg)).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(train["expressions"][idx])
    loss = F.mse_loss(A._raw_flame(model, x) / scale, y / scale)
    return loss, {"loss": f"{loss.item():.4f}"}
fit(model.parameters(), cfg.steps, cfg.lr, cfg.weight_decay, 0.15, "finetune", step)
model = model.to(memory_format=torch.contiguous_format).eval()
m = A.expression_metrics(model, held["images"], held_dec, held["expressions"], train["expressions"].mean(0))
out.write_text(json.dumps({"recipe": recipe, "wall_s": time.perf_counter() - t, "metrics": m}, indent=1))
for k, (mae, b) in m["per_component_mae_vs_mean_predictor_decoded"].items():
    print(f"{k:24s} {mae / b:.3f}  sharp {m['per_component_mae_vs_mean_predictor'][k][0] / b:.3f}")
print("readable_decoded", m["readable_decoded"])
