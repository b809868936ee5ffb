"""Exploration only: fine-tune a build's toy VAE (ROOT/vae) for STEPS with the pixel loss weighted up to 1+AMP at the
aligned face's centre (AMP 0: the plain loss, as a control of the extra training), save it to OUT and print PSNR on
the held-out renders, whole frame and face box. MAP "regions" weights instead by how often the renderer's eye, brow
and mouth regions (region_masks) cover a pixel over 400 random people and poses. Usage: vae_weighted.py ROOT OUT
STEPS AMP [face|regions]"""
import sys, numpy as np, torch
from pathlib import Path
from diffusers import AutoencoderKL
from blendexp.toyworld import assets
from blendexp.toyworld.annotators import shrink_all
from blendexp.toyworld.autoencoder import face_weights, to_pixels, round_trip, psnr
from blendexp.toyworld.fitting import fit
from blendexp.toyworld.params import sample_identity, sample_nuisance
from blendexp.toyworld.render import region_masks
torch.set_num_threads(2); torch.manual_seed(0)
root, out, steps, amp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
train = shrink_all(assets.load_renders(root, "train")["images"])
held = shrink_all(assets.load_renders(root, "heldout")["images"])
vae = AutoencoderKL.from_pretrained(root / "vae").train()
def region_weights(size, amp, n=400, keys=("left_eye", "right_eye", "brows", "mouth")):
    r = np.random.default_rng(123); cover = np.zeros((size, size))
    for _ in range(n):
        m = region_masks(sample_identity(r), size, sample_nuisance(r, 1.0)); cover += np.any([m[k] for k in keys], 0)
    w = 1 + amp * torch.from_numpy(cover / n).float(); return w / w.mean()
kind = sys.argv[5] if len(sys.argv) > 5 else "face"
w = face_weights(64, amp) if kind == "face" else region_weights(64, amp)  # face: the build's (VaeTraining.face_weight)
rng = np.random.default_rng(0)
def step():
    x = to_pixels(train[rng.integers(len(train), size=16)])
    post = vae.encode(x).latent_dist
    err = ((vae.decode(post.sample()).sample - x) ** 2 * w).mean()
    return err + 1e-6 * post.kl().mean(), {"wmse": f"{err.item():.4f}"}
fit(vae.parameters(), steps, 5e-4, 0.0, 0.05, "vae finetune", step)
vae.eval(); vae.save_pretrained(out)
rec = round_trip(vae, held)
print("psnr", psnr(rec, held).mean(), "face box psnr", psnr(rec[:, 20:58, 16:48], held[:, 20:58, 16:48]).mean())
