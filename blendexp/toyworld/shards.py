"""Toy-world faces written as shards in the shard contract: the embedded default data of every entry point.

``python -m blendexp.toyworld.shards data/sample`` renders subjects with random expressions and nuisances and
writes ``train-*.tar`` / ``val-*.tar`` (disjoint subjects). By default the identity embedding is a fixed random
projection of the ground-truth identity vector (recorded as ``id_model``); ``python -m blendexp.toyworld.assets``
writes shards whose embeddings come from the trained toy recogniser instead.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from blendexp.data.format import FaceSample, encode_sample, make_key, vae_latents
from blendexp.flame import ID_DIM
from blendexp.toyworld.params import (IDENTITY_DIM, Identity, identity_rng, sample_expression, sample_identity,
                                      sample_nuisance)
from blendexp.toyworld.render import render_face
from blendexp.toyworld.video import make_clip

GT_ID_MODEL = "toyworld-gt-projection-v1"


def gt_identity_embedding(identity: Identity, seed: int = 1234) -> np.ndarray:
    """A 512-d unit vector that is a fixed function of the identity parameters (stand-in for ArcFace)."""
    proj = np.random.default_rng(seed).standard_normal((IDENTITY_DIM, ID_DIM)).astype(np.float32)
    vec = identity.to_vector().astype(np.float32)
    emb = np.tanh((vec - vec.mean()) / (vec.std() + 1e-6)) @ proj
    return emb / np.linalg.norm(emb)


def _subject_faces(rng: np.random.Generator, identity: Identity, n: int, size: int,
                   clip: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(n, size, size, 3) faces and (n, 55) expressions: independent photos, or the frames of one clip."""
    if clip:
        c = make_clip(identity, rng, n, size, nuisance_strength=0.5)
        return c.frames, c.expressions
    exps, images = [], []
    for _ in range(n):  # expression then conditions, photo by photo: the order the shipped sample was drawn in
        exps.append(sample_expression(rng))
        images.append(np.asarray(render_face(identity, exps[-1], sample_nuisance(rng, 0.5), size=size)))
    return np.stack(images), np.stack(exps)


def write_split(out: Path, split: str, subjects: range, per_subject: int, size: int, seed: int,
                per_shard: int, embed: Callable[[np.ndarray], np.ndarray] | None = None,
                id_model: str = GT_ID_MODEL, clips: bool = False, vae: Any | None = None) -> int:
    """Render ``per_subject`` faces for each subject into ``<split>-%06d.tar`` shards; returns the count.

    Faces are independent stills, or with ``clips`` the frames of one talking-head clip per subject (one background
    and slowly drifting pose and light: the Reference Adapter's (reference, target) pairs). ``embed`` maps one
    subject's (N, size, size, 3) uint8 faces to (N, 512) unit vectors, e.g. a trained toy recogniser (then name it
    in ``id_model``); without it every face gets ``gt_identity_embedding``. With ``vae`` (the base's AutoencoderKL)
    each sample also carries its cached ``latents.npy``, as the real data build writes them."""
    import webdataset as wds  # here: it loads torch, which --help does not need

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for subject in tqdm(subjects, desc=f"toy {split}", unit="subject"):
            rng = identity_rng(seed, "stills", subject)
            identity = sample_identity(rng)
            images, exps = _subject_faces(rng, identity, per_subject, size, clips)
            ids = embed(images) if embed else [gt_identity_embedding(identity)] * per_subject
            latents = vae_latents(vae, images) if vae is not None else [None] * per_subject
            for i, (image, exp, id_emb, lat) in enumerate(zip(images, exps, ids, latents)):
                subj, name, frame = f"s{subject:05d}", "c000" if clips else f"i{i:03d}", i if clips else 0
                meta = {"source": "toy", "subject": subj, "clip": name if clips else None, "frame": frame,
                        "id_model": id_model, "exp_model": "toyworld-ground-truth"}
                if not clips:
                    meta["image"] = name
                sink.write(encode_sample(FaceSample(make_key("toy", subj, name, frame), image, id_emb, exp, meta, lat)))
                n += 1
    return n


def main() -> None:
    """CLI: deterministic sample shards (data/sample/README.md gives the command that made the shipped ones)."""

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train-subjects", type=int, default=48)
    p.add_argument("--val-subjects", type=int, default=8)
    p.add_argument("--per-subject", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arcface", type=Path, default=None,
                   help="embed faces with this recogniser ONNX (e.g. data/toy/models/antelopev2/arcface.onnx, the "
                        "trained toy one) instead of the fixed projection of the true identity")
    a = p.parse_args()
    from blendexp.toyworld.assets import TOY_ID_MODEL, toy_embedder  # imports this module; loads torch

    embed = dict(embed=toy_embedder(a.arcface), id_model=TOY_ID_MODEL) if a.arcface else {}
    n_train = write_split(a.out, "train", range(a.train_subjects), a.per_subject, a.size, a.seed, a.per_shard, **embed)
    n_val = write_split(a.out, "val", range(a.train_subjects, a.train_subjects + a.val_subjects), a.per_subject,
                        a.size, a.seed, a.per_shard, **embed)
    (a.out / "README.md").write_text(
        "Toy-world sample shards (shard contract v1), made by\n\n"
        f"    python -m blendexp.toyworld.shards {a.out} --train-subjects {a.train_subjects} --val-subjects "
        f"{a.val_subjects} --per-subject {a.per_subject} --size {a.size} --per-shard {a.per_shard} --seed {a.seed}"
        f"{f' --arcface {a.arcface}' if a.arcface else ''}\n\n"
        f"{n_train} training and {n_val} validation faces; subjects are disjoint between splits.\n")
    print(json.dumps({"train": n_train, "val": n_val, "out": str(a.out)}))


if __name__ == "__main__":
    main()
