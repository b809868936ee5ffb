import sys, numpy as np, torch
from dataclasses import replace
from blendexp.toyworld import annotators as A
from blendexp.toyworld.recipes import ExpressionTraining
from blendexp.toyworld.params import identity_rng, sample_identity, neutral_expression, Nuisance
from blendexp.toyworld.render import render_face
from blendexp.flame import MAPPED_COMPONENTS, component_index
torch.set_num_threads(2)
k = component_index(sys.argv[1] if len(sys.argv) > 1 else "exp.0")  # usage: single_component.py [COMPONENT]
low, high = MAPPED_COMPONENTS[k].low, MAPPED_COMPONENTS[k].high
def make(stream, n):
    ims, exps = [], []
    for s in range(n):
        rng = identity_rng(0, stream, s); idn = sample_identity(rng)
        for _ in range(4):
            e = neutral_expression(); e[k] = rng.uniform(low, high) if rng.random() < 0.5 else 0.0
            ims.append(np.asarray(render_face(idn, e, Nuisance.none(), 128))); exps.append(e)
    return np.stack(ims), np.stack(exps)
tr, ytr = make("annotator_train", 200)
te, yte = make("annotator_heldout", 30)
cfg = replace(ExpressionTraining(), steps=300, decoded_p=0.0, blur_p=0.0, small_p=0.0)
m = A.train_expression_encoder(tr, tr, ytr, cfg, 0)
p = A.predict_expressions(m, te)[:, k]
print("corr", np.corrcoef(p, yte[:, k])[0, 1], "MAE ratio", np.abs(p - yte[:, k]).mean() / np.abs(yte[:, k] - ytr[:, k].mean()).mean())
