"""Exploration only: how much of each component's pixel change (its full range, 64 px, no photo conditions) survives a VAE round trip: regression of the decoded change on the sharp one ("kept") and their correlation. Usage: vae_survival.py VAE_DIR [THREADS] [OUT.json]"""
import json, sys, numpy as np, torch
from diffusers import AutoencoderKL
from blendexp.toyworld.params import identity_rng, sample_identity, neutral_expression, Nuisance
from blendexp.toyworld.render import render_face
from blendexp.toyworld.autoencoder import round_trip
from blendexp.toyworld.annotators import shrink_all
from blendexp.flame import MAPPED_COMPONENTS, COMPONENT_NAMES
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
vae = AutoencoderKL.from_pretrained(sys.argv[1]).eval()
ids = [sample_identity(identity_rng(0, "annotator_heldout", s)) for s in range(12)]
rows = {}
for i, c in MAPPED_COMPONENTS.items():
    lo, hi = [], []
    for idn in ids:
        for v, out in ((c.low, lo), (c.high, hi)):
            e = neutral_expression(); e[i] = v
            out.append(np.asarray(render_face(idn, e, Nuisance.none(), 128)))
    lo, hi = shrink_all(lo), shrink_all(hi)
    with torch.no_grad():
        dlo, dhi = round_trip(vae, lo), round_trip(vae, hi)
    sd = (hi.astype(float) - lo).reshape(len(ids), -1); dd = (dhi.astype(float) - dlo).reshape(len(ids), -1)
    kept = (sd * dd).sum() / (sd * sd).sum(); corr = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(sd, dd)])
    print(f"{COMPONENT_NAMES[i]:>10} {c.name:<14} sharp |d| {np.abs(sd).mean():6.3f} decoded |d| {np.abs(dd).mean():6.3f} "
          f"kept {kept:5.2f} corr {corr:5.2f}", flush=True)
    rows[c.name] = {"kept": float(kept), "corr": float(corr)}
if len(sys.argv) > 3:
    open(sys.argv[3], "w").write(json.dumps({"vae": sys.argv[1], "components": rows}, indent=1))
