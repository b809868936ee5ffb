"""Exploration only: re-measure a build's annotators on fresh identities as tests/toyworld/test_shipped.py does
(annotator_figures: 48 fresh identities x 8 photos, their 64 px VAE round trips), from a temporary shipped copy of the
build. Usage: PYTHONPATH=. fresh_faces.py ROOT SEED OUT.json"""
import json, sys, tempfile
from pathlib import Path
from blendexp.toyworld.assets import ship
import tests.toyworld.test_shipped as ts
root, seed, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
dest = Path(tempfile.mkdtemp()) / "toy"
ship(root, dest)
ts.SHIPPED_ROOT = dest
ts.ARCFACE, ts.SMIRK = dest / "models/antelopev2/arcface.onnx", dest / "models/smirk/SMIRK_em1.pt"
fig = ts.annotator_figures(seed)
out.write_text(json.dumps(fig, indent=1)); print(json.dumps(fig, indent=1))
