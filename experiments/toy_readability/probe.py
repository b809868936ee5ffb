"""Exploration only: how readable is each mapped component on decoded faces, for a render amplitude and a recipe."""
import json, sys, time
from dataclasses import replace
import numpy as np, torch
from diffusers import AutoencoderKL
import blendexp.toyworld.render as R
from blendexp.toyworld.recipes import ExpressionTraining
from blendexp.toyworld import annotators as A
from blendexp.toyworld.autoencoder import round_trip
from blendexp.toyworld.assets import render_set

args = json.loads(sys.argv[1])
amp = args.get("amp", 1.0)
for k in ("CORNER_LIFT", "CORNER_OUT", "BROW_LIFT", "BROW_LOWER", "FURROW_DROP", "FURROW_IN", "NOSE_LIFT"):
    setattr(R, k, getattr(R, k) * amp)
for k in ("PUCKER_NARROW", "STRETCH_WIDEN", "NOSTRIL_FLARE", "JAW_SHIFT"):
    setattr(R, k, getattr(R, k) * args.get("amp2", 1.0))
torch.set_num_threads(args.get("threads", 2))
if args.get("tint"):  # lateral patches (cu != 0) tinted by side: left and right become colours, not places
    _plain_shade = R._shade
    def _tinted(d, skin, cu, cv, ru, rv, k):
        hue = np.array((-1.0, 0.2, 1.0) if cu > 0 else (1.0, -0.2, -1.0) if cu < 0 else (0.0, 0.0, 0.0))
        _plain_shade(d, tuple(np.clip(np.asarray(skin, float) + args["tint"] * abs(k) * hue, 0, 1)), cu, cv, ru, rv, k)
    R._shade = _tinted
if args.get("std_loss"):
    from blendexp.toyworld.params import sample_expression
    r = np.random.default_rng(1)
    std = np.stack([sample_expression(r) for _ in range(20000)]).std(0)
    A.LOSS_SCALE = np.where(std > 0, std, 1.0).astype(np.float32)
    print("loss scale", A.LOSS_SCALE[list(A.MAPPED)])
t = time.time()
nz = args.get("nuisance", 1.0)
import blendexp.toyworld.assets as AS
from blendexp.toyworld import params as PR
_orig = PR.sample_expression
def _sparse(rng, scale=1.0, p=args.get("p_active", 0.5)):
    out = PR.neutral_expression(); idx = np.fromiter(PR.MAPPED_COMPONENTS, dtype=int)
    lo = np.array([c.low for c in PR.MAPPED_COMPONENTS.values()]); hi = np.array([c.high for c in PR.MAPPED_COMPONENTS.values()])
    active = rng.random(len(idx)) < p
    out[idx] = np.where(active, np.clip(rng.uniform(lo, hi) * scale, lo, hi), 0.0)
    return out
AS.sample_expression = _sparse
train = render_set(0, "annotator_train", range(args.get("subjects", 400)), args.get("per", 16), 128, nz)
AS.sample_expression = _orig
held = render_set(0, "annotator_heldout", range(48), 8, 128, nz)
vae = AutoencoderKL.from_pretrained("data/toy/stable-diffusion-v1-5/vae")
tr_dec, he_dec = (round_trip(vae, A.shrink_all(x["images"], 64)) for x in (train, held))
print("render+decode", time.time() - t, flush=True)
cfg = replace(ExpressionTraining(), steps=args["steps"], lr=args.get("lr", 1e-3), batch_size=args.get("bs", 16), **args.get("recipe", {}))
t = time.time()
model = A.train_expression_encoder(train["images"], tr_dec, train["expressions"], cfg, 0)
print("train", time.time() - t, flush=True)
m = A.expression_metrics(model, held["images"], he_dec, held["expressions"], train["expressions"].mean(0))
for key in ("per_component_mae_vs_mean_predictor", "per_component_mae_vs_mean_predictor_decoded"):
    r = {n: round(a / b, 2) for n, (a, b) in m[key].items()}
    print(key, r, "readable<=0.5:", sum(v <= 0.5 for v in r.values()), flush=True)
torch.save(model.state_dict(), args["out"] + ".pt")
json.dump({"args": args, "metrics": m}, open(args["out"], "w"), indent=1)
