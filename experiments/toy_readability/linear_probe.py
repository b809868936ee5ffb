import numpy as np, torch, torch.nn.functional as F
from blendexp.faces.expression import SmirkExpressionEncoder
from blendexp.toyworld import annotators as A
from blendexp.toyworld.assets import render_set
from blendexp.flame import MAPPED_COMPONENTS
m = SmirkExpressionEncoder(); m.load_state_dict(torch.load("/tmp/v2/r2.json.pt", weights_only=True)); m.eval()
idx = list(MAPPED_COMPONENTS)
def feats(stream, n, per):
    d = render_set(0, stream, range(n), per, 128, 1.0)
    out = []
    with torch.no_grad():
        for s in range(0, len(d["images"]), 64):
            x = A.smirk_inputs(d["images"][s:s+64])
            out.append(F.adaptive_avg_pool2d(m.encoder(x)[-1], 1).flatten(1).numpy())
    return np.concatenate(out), d["expressions"][:, idx]
Xtr, ytr = feats("annotator_train", 100, 16)
Xte, yte = feats("annotator_heldout", 24, 8)
from numpy.linalg import solve
mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
A_ = (Xtr - mu) / sd; B_ = (Xte - mu) / sd
for lam in (10.0, 100.0):
    W = solve(A_.T @ A_ + lam * np.eye(A_.shape[1]), A_.T @ (ytr - ytr.mean(0)))
    p = B_ @ W + ytr.mean(0)
    print(lam, [round(np.corrcoef(p[:, k], yte[:, k])[0, 1], 2) for k in range(13)])
base = np.abs(yte - ytr.mean(0)).mean(0)
W = solve(A_.T @ A_ + 100.0 * np.eye(A_.shape[1]), A_.T @ (ytr - ytr.mean(0)))
p = B_ @ W + ytr.mean(0)
print("ridge MAE / mean predictor:", [round(float(v), 2) for v in np.abs(p - yte).mean(0) / base])
