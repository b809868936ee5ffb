import numpy as np, torch, sys
from blendexp.faces.expression import SmirkExpressionEncoder
from blendexp.toyworld import annotators as A
from blendexp.toyworld.assets import render_set
from blendexp.flame import MAPPED_COMPONENTS
m = SmirkExpressionEncoder(); m.load_state_dict(torch.load(sys.argv[1], weights_only=True)); m.eval()
held = render_set(0, "annotator_heldout", range(48), 8, 128, float(sys.argv[2]))
p = A.predict_expressions(m, held["images"])
idx = list(MAPPED_COMPONENTS)
names = [c.name for c in MAPPED_COMPONENTS.values()]
t = held["expressions"]
C = np.corrcoef(np.concatenate([p[:, idx], t[:, idx]], 1).T)[:13, 13:]
np.set_printoptions(precision=2, suppress=True, linewidth=200)
print("corr(pred_i, true_j):")
for i, n in enumerate(names): print(f"{n:14s}", C[i])
print("corr(|pred|,|true|):", [round(np.corrcoef(np.abs(p[:, k]), np.abs(t[:, k]))[0, 1], 2) for k in idx])
print("pred std", p[:, idx].std(0), "true std", t[:, idx].std(0))
