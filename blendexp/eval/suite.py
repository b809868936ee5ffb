"""The evaluation protocol: every method generates N fixed-seed samples per (source face, target expression) pair,
cached on disk, and every image is scored with the same annotators.

Generations live at ``<run>/generations/<method>/<source>/<target>_<k>.png`` (seeded by ``pair_seed``) next to a
``settings.json`` manifest: an image on disk is never generated again, so a re-run only scores and an interrupted
run resumes; a manifest that disagrees with the configuration stops the run instead of mixing settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from blendexp.data.image_sets import InputImage, Skipped, is_shards, read_images
from blendexp.eval.features import build_feature_extractor, image_features
from blendexp.eval.inputs import Target, check_input, flame_files, flame_targets
from blendexp.eval.methods import Arc2FaceMethod, FolderMethod, Method, build_method, check_method
from blendexp.eval.metrics import Estimate, border_l1, cosine_similarity, expression_errors, mean_ci, set_metrics
from blendexp.faces.align import align_ffhq
from blendexp.faces.annotators import Annotators, FaceReadout, build_annotators
from blendexp.faces.landmarks import alignment_points
from blendexp.flame import EXP_DIM
from blendexp.images import load_image
from blendexp.results import write_atomic

log = logging.getLogger(__name__)

ALIGNED_SIZE = 512  # px of a photo source's aligned face, as the official reference path aligns
PER_IMAGE_METRICS = ("id_sim", "id_sim_facenet", "exp_mae", "exp_l2", "exp_mae_expression", "exp_mae_eyelid",
                     "exp_mae_jaw", "bg_l1")


@dataclass
class Source:
    """A usable source face: its image and reference embeddings (ArcFace also conditions the generation)."""

    name: str
    origin: str
    image: np.ndarray  # the photo as read
    aligned: np.ndarray  # its FFHQ-aligned face: the reference image (expr_ref), bg_l1's reference, the grids' cell
    arcface: np.ndarray  # (512,)
    facenet: np.ndarray | None  # (512,)


@dataclass
class EvalSet:
    """Source faces × target expressions, and every input that had to be left out."""

    sources: list[Source]
    targets: list[Target]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # repeated at the top of the report

    def pairs(self, samples: int) -> list[tuple[int, int, int]]:
        """(source index, target index, sample k) for every image a method must produce."""
        return [(s, t, k) for s in range(len(self.sources)) for t in range(len(self.targets)) for k in range(samples)]


@dataclass
class SuiteResult:
    """Everything the report needs: one row per image, component errors, summaries with intervals."""

    test: EvalSet
    per_image: pd.DataFrame
    expression: dict[str, np.ndarray]  # method -> (N, 2, 55) target and read FLAME of the images with a face
    summary: dict[str, dict[str, Estimate]]
    counts: dict[str, dict[str, int]]  # method -> images scored / missing


@dataclass(frozen=True)
class Share:
    """The share of the work one process does: part ``index`` of ``size`` (an array job), or all of it."""

    index: int = 0
    size: int = 1

    def slice(self, items: Sequence[Any], unit: int = 1) -> Sequence[Any]:
        """This part's contiguous run of ``items``, cut at multiples of ``unit`` (scoring batches then are the
        batches one process makes, so the parts' numbers are that process's, bit for bit)."""
        blocks = -(-len(items) // unit)
        return items[self.index * blocks // self.size * unit:(self.index + 1) * blocks // self.size * unit]

    def file(self, name: str) -> str:
        """``name`` for this part (``inputs.part-0001-of-0004.json``); unchanged for a whole run."""
        stem, dot, ext = name.partition(".")
        return name if self.size == 1 else f"{stem}.part-{self.index:04d}-of-{self.size:04d}{dot}{ext}"


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``size`` items (batches for models and progress bars)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def read_faces(annotators: Annotators, images: Sequence[np.ndarray], batch_size: int, desc: str,
               aligned: bool = False) -> FaceReadout:
    """``Annotators.read`` over many images in batches, with a progress bar."""
    parts = [annotators.read(b, aligned) for b in tqdm(list(chunks(images, batch_size)), desc=desc, disable=None)]
    if not parts:
        return annotators.read([])
    return FaceReadout(found=np.concatenate([p.found for p in parts]), arcface=np.concatenate([p.arcface for p in parts]),
                       facenet=None if parts[0].facenet is None else np.concatenate([p.facenet for p in parts]),
                       exp=np.concatenate([p.exp for p in parts]), faces=[f for p in parts for f in p.faces])


def _select(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The subset options shared by sources and targets."""
    return {"limit": cfg.get("limit"), "offset": int(cfg.get("offset") or 0), "per_subject": cfg.get("per_subject")}


def load_sources(cfg: Mapping[str, Any], annotators: Annotators, skipped: list[Skipped], batch: int) -> list[Source]:
    """Source faces with their embeddings; images without a detectable face are listed as skipped."""
    items = read_images(cfg["path"], "source", skipped, **_select(cfg))
    shards = is_shards(cfg["path"])
    faces = read_faces(annotators, [i.image for i in items], batch, "read sources", aligned=shards)
    sources = []
    for i, item in enumerate(items):
        face = faces.faces[i]
        if face is None:
            log.warning("source %s: no face detected; skipped", item.origin)
            skipped.append(Skipped("source", item.origin, "no face detected"))
            continue
        aligned = item.image if shards else align_ffhq(item.image, alignment_points(face), ALIGNED_SIZE)  # shards: aligned
        sources.append(Source(item.name, item.origin, item.image, aligned,
                              faces.arcface[i], None if faces.facenet is None else faces.facenet[i]))
    if not sources:
        raise ValueError(f"no usable source faces in {cfg['path']}: every image was skipped "
                         f"({'; '.join(f'{s.origin}: {s.reason}' for s in skipped[:5])})")
    return sources


def _nonempty(targets: list[Target], cfg: Mapping[str, Any]) -> list[Target]:
    """Fail naming the path and the subset options when nothing is left to use as a target."""
    if not targets:
        raise ValueError(f"no usable target expressions in {cfg['path']} (offset={cfg.get('offset')}, "
                         f"limit={cfg.get('limit')}); check eval.targets")
    return targets


def read_flame_targets(cfg: Mapping[str, Any]) -> list[Target] | None:
    """Targets from FLAME files (None when the path holds images or shards); read before any model loads."""
    files = flame_files(Path(cfg["path"]))
    if files is None:
        return None
    sel = _select(cfg)
    end = None if sel["limit"] is None else sel["offset"] + sel["limit"]
    return _nonempty([t for f in files for t in flame_targets(f)][sel["offset"]:end], cfg)


def load_targets(cfg: Mapping[str, Any], annotators: Annotators, skipped: list[Skipped], batch: int) -> list[Target]:
    """Target expressions from shards (their ``exp.npy``) or driving images (through SMIRK; faceless ones skipped)."""
    items: list[InputImage] = read_images(cfg["path"], "target", skipped, **_select(cfg))
    driving = [i for i in items if i.exp is None]
    faces = read_faces(annotators, [i.image for i in driving], batch, "read driving images")
    exps = {id(item): faces.exp[j] for j, item in enumerate(driving) if faces.found[j]}
    targets = []
    for item in items:
        exp = item.exp if item.exp is not None else exps.get(id(item))
        if exp is None:
            log.warning("driving image %s: no face detected; skipped", item.origin)
            skipped.append(Skipped("target", item.origin, "no face detected"))
            continue
        targets.append(Target(item.name, item.origin, exp, item.image))
    return _nonempty(targets, cfg)


def check_manifest(folder: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix images made with other settings into a cache folder; write the manifest on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "settings.json"
    settings = json.loads(json.dumps(settings, default=str))
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old != settings:
            diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings) if old.get(k) != settings.get(k)}
            raise ValueError(f"cached generations in {folder} were made with other settings {diff}; delete that "
                             f"folder or evaluate under another run_name=")
    else:  # array parts may start together: each writes the same file whole
        write_atomic(manifest, json.dumps(settings, indent=2, sort_keys=True))


def pair_seed(seed: int, source: str, target: str, k: int) -> int:
    """Sample ``k``'s seed for one (source, target) pair: the same for every method (paired comparisons), different
    across pairs (independent samples for the confidence intervals), stable under reordering of the test set."""
    return int(np.random.SeedSequence([seed, zlib.crc32(source.encode()), zlib.crc32(target.encode()), k])
               .generate_state(1)[0])


def generation_path(folder: Path, source: str, target: str, k: int) -> Path:
    """Where one generated image lives (the layout external baselines use too)."""
    return folder / source / f"{target}_{k}.png"


def _digest(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (what conditions a generation)."""
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def input_keys(test: EvalSet) -> dict[str, dict[str, str]]:
    """What conditions each cached image: per source its ArcFace embedding and aligned face (detector, recogniser
    and photo all show there), per target its FLAME vector; rounded so that float noise does not count."""
    return {"sources": {s.name: _digest(np.round(s.arcface, 4), s.aligned) for s in test.sources},
            "targets": {t.name: _digest(np.round(t.exp, 5)) for t in test.targets}}


def drop_stale(method: str, folder: Path, test: EvalSet, share: Share, jobs: list[tuple[int, int, int]]) -> int:
    """Delete cached images whose source or target changed since they were made (or that predate the record), so
    they are made again, and record the current inputs first (an interrupted run leaves a consistent cache). An
    array part looks only at its own ``jobs`` and keeps its own record (the merge writes the shared one)."""
    record, shared = folder / share.file("inputs.json"), folder / "inputs.json"
    known = record if record.is_file() else shared
    old = json.loads(known.read_text()) if known.is_file() else {"sources": {}, "targets": {}}
    new = input_keys(test)
    changed = {role: {n for n, key in new[role].items() if old[role].get(n) != key} for role in new}
    mine = {generation_path(folder, test.sources[s].name, test.targets[t].name, k) for s, t, k in jobs}
    stale = [p for s in test.sources for p in sorted((folder / s.name).glob("*.png"))
             if (s.name in changed["sources"] or p.stem.rsplit("_", 1)[0] in changed["targets"])
             and (share.size == 1 or p in mine)]
    for path in stale:
        path.unlink()
    if stale:
        names = sorted(changed["sources"] & {p.parent.name for p in stale}) + sorted(
            changed["targets"] & {p.stem.rsplit("_", 1)[0] for p in stale})
        log.warning("%s: %d cached images were made from other inputs (%s); generating them again", method,
                    len(stale), ", ".join(names[:8]) + (" ..." if len(names) > 8 else ""))
    write_atomic(record, json.dumps({r: {**old[r], **new[r]} for r in new}, indent=1, sort_keys=True))
    return len(stale)


def generate_missing(method: Arc2FaceMethod, test: EvalSet, folder: Path, jobs: list[tuple[int, int, int]],
                     batch_size: int, seed: int, share: Share) -> int:
    """Generate those of ``jobs`` not on disk yet (atomically, so an interrupted run leaves no half-written file)."""
    drop_stale(method.name, folder, test, share, jobs)
    todo = [j for j in jobs if not generation_path(folder, test.sources[j[0]].name, test.targets[j[1]].name,
                                                   j[2]).is_file()]
    log.info("%s: %d/%d images cached, %d to generate", method.name, len(jobs) - len(todo), len(jobs), len(todo))
    if not todo:
        return 0
    method.load(folder)
    for batch in tqdm(list(chunks(todo, batch_size)), desc=f"generate {method.name}", disable=None):
        srcs, tgts = [test.sources[s] for s, _, _ in batch], [test.targets[t] for _, t, _ in batch]
        images = method.generate(np.stack([s.arcface for s in srcs]), np.stack([t.exp for t in tgts]),
                                 [s.aligned for s in srcs],
                                 [pair_seed(seed, s.name, t.name, k) for s, t, (_, _, k) in zip(srcs, tgts, batch)])
        for (s, t, k), image in zip(batch, images):
            path = generation_path(folder, test.sources[s].name, test.targets[t].name, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".partial.png")
            Image.fromarray(image).save(tmp)
            os.replace(tmp, path)
    method.close()
    return len(todo)


Jobs = list[tuple[tuple[int, int, int], Path | None]]


def image_paths(method: Method, test: EvalSet, samples: int, folder: Path) -> Jobs:
    """Each (source, target, sample) with its image file (None where an external folder lacks it)."""
    out: Jobs = []
    for s, t, k in test.pairs(samples):
        src, tgt = test.sources[s].name, test.targets[t].name
        path = method.image_path(src, tgt, k) if isinstance(method, FolderMethod) else generation_path(folder, src, tgt, k)
        out.append(((s, t, k), path))
    return out


def check_external(method: FolderMethod, jobs: Jobs) -> int:
    """Count an external folder's missing images; a folder with none of them is a naming mistake, so fail."""
    missing = sum(p is None for _, p in jobs)
    if missing == len(jobs):
        raise FileNotFoundError(f"{method.name}: none of the {len(jobs)} expected images is in {method.root}; name "
                                f"them <source>/<target>_<k>.png with the names in sources.csv / targets.csv")
    if missing:
        log.warning("%s: %d of %d images missing in %s", method.name, missing, len(jobs), method.root)
    return missing


def score_images(name: str, jobs: Jobs, test: EvalSet,
                 annotators: Annotators, extractor: torch.nn.Module, batch_size: int, device: str
                 ) -> tuple[list[dict[str, Any]], np.ndarray, torch.Tensor]:
    """Per-image rows, (N, 2, 55) target and read FLAME vectors of images with a face, FID features."""
    rows, readings, feats = [], [], []
    present = [(job, path) for job, path in jobs if path is not None]
    for batch in tqdm(list(chunks(present, batch_size)), desc=f"score {name}", disable=None):
        images = [load_image(path) for _, path in batch]
        faces = annotators.read_generated(images)
        feats.append(image_features(extractor, images, device))
        src = [test.sources[s] for (s, _, _), _ in batch]
        tgt = np.stack([test.targets[t].exp for (_, t, _), _ in batch])
        err = expression_errors(faces.exp, tgt)
        values = {"id_sim": cosine_similarity(faces.arcface, np.stack([x.arcface for x in src])), **err,
                  "bg_l1": border_l1(images, [x.aligned for x in src])}
        if faces.facenet is not None:
            values["id_sim_facenet"] = cosine_similarity(faces.facenet, np.stack([x.facenet for x in src]))
        readings.append(np.stack([tgt, faces.exp], axis=1)[faces.found].astype(np.float32))
        for i, ((s, t, k), path) in enumerate(batch):
            rows.append({"method": name, "source": test.sources[s].name, "target": test.targets[t].name, "sample": k,
                         "path": str(path), "face": bool(faces.found[i]),
                         **{m: float(values[m][i]) for m in PER_IMAGE_METRICS if m in values}})
    if not rows:  # an array part whose share of this method is empty
        return rows, np.zeros((0, 2, EXP_DIM), np.float32), torch.zeros(0)
    return rows, np.concatenate(readings), torch.cat(feats)


def real_features(cfg: Mapping[str, Any], test: EvalSet, extractor: torch.nn.Module, batch_size: int,
                  device: str) -> torch.Tensor:
    """FID's real set: ``fid.real`` (a folder or shards) or, when null, the usable source faces."""
    if cfg.get("real"):
        images = [i.image for i in read_images(cfg["real"], "real", [], limit=cfg.get("real_limit"))]
    else:
        images = [s.aligned for s in test.sources]
    return torch.cat([image_features(extractor, b, device) for b in chunks(images, batch_size)])


def toy_warnings(cfg: Mapping[str, Any], annotators: Annotators, flame_targets: bool) -> list[str]:
    """A warning when photo folders (not shards, which the toy world writes) are read with toy instruments."""
    roles = ["source"] + ([] if flame_targets else ["target"])
    photos = [f"eval.{r}s.path={cfg[r + 's']['path']}" for r in roles if not is_shards(cfg[r + "s"]["path"])]
    warning = annotators.toy_warning("photos of " + " and ".join(photos)) if photos else None
    if warning:
        log.warning(warning)
    return [warning] if warning else []


def load_test_set(cfg: Mapping[str, Any], annotators: Annotators, batch: int, run_dir: Path,
                  flame_targets: list[Target] | None) -> EvalSet:
    """Sources and targets, with their names written to ``sources.csv`` / ``targets.csv`` (the naming scheme)."""
    skipped: list[Skipped] = []
    sources = load_sources(cfg["sources"], annotators, skipped, batch)
    targets = flame_targets or load_targets(cfg["targets"], annotators, skipped, batch)
    test = EvalSet(sources, targets, skipped, toy_warnings(cfg, annotators, flame_targets is not None))
    pd.DataFrame([{"source": s.name, "origin": s.origin} for s in test.sources]).to_csv(run_dir / "sources.csv", index=False)
    pd.DataFrame([{"target": t.name, "origin": t.origin} for t in test.targets]).to_csv(run_dir / "targets.csv", index=False)
    return test


def summarise(rows: list[dict[str, Any]], real: torch.Tensor, fake: torch.Tensor, fid: Mapping[str, Any],
              seed: int) -> dict[str, Estimate]:
    """Every metric of one method: per-image means with t intervals, FID/KID with bootstrap intervals."""
    frame = pd.DataFrame(rows)
    return {"no_face_rate": mean_ci(1.0 - frame["face"].to_numpy(float)),
            **{k: mean_ci(frame[k].to_numpy(float)) for k in PER_IMAGE_METRICS if k in frame},
            **set_metrics(real, fake, int(fid.get("bootstrap", 20)), int(fid.get("kid_subsets", 50)),
                          int(fid.get("kid_subset_size", 1000)), seed)}


@dataclass
class Plan:
    """Everything set up before the work: methods, their folders and images, the test set and the instruments."""

    cfg: Mapping[str, Any]
    methods: list[Method]
    folders: dict[str, Path]
    test: EvalSet
    jobs: dict[str, Jobs]
    missing: dict[str, int]
    annotators: Annotators
    extractor: torch.nn.Module
    gen_batch: int
    batch: int
    device: str
    seed: int

    def fingerprint(self) -> str:
        """What a part's scores depend on: the inputs, every setting but the report's, the seed."""
        settings = {k: v for k, v in self.cfg.items() if k != "report"}
        blob = json.dumps([input_keys(self.test), settings, self.seed], sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()


Scores = dict[str, tuple[list[dict[str, Any]], np.ndarray, torch.Tensor]]  # method -> rows, FLAME readings, features


def plan_suite(cfg: Mapping[str, Any], run_dir: Path, device: str, seed: int) -> Plan:
    """Check the inputs and methods, load the instruments and the test set, list every image to score."""
    for role in ("source", "target"):
        check_input(cfg[f"{role}s"]["path"], role)
    flame_targets = read_flame_targets(cfg["targets"])  # a bad FLAME file fails before any model loads
    batch = int(cfg.get("batch_size", 16))
    gen = dict(cfg["generation"])
    samples, gen_batch = int(gen.pop("samples", 1)), int(gen.pop("batch_size", 8))
    for name, m in cfg["methods"].items():
        check_method(name, m, gen)
    methods = [build_method(name, m, cfg["base"], gen, device, seed) for name, m in cfg["methods"].items()]
    if not methods:
        raise ValueError("eval.methods is empty; configure at least one (e.g. eval.methods.arc2face.kind=arc2face)")
    folders = {m.name: run_dir / "generations" / m.name for m in methods}
    for m in methods:
        if isinstance(m, Arc2FaceMethod):
            check_manifest(folders[m.name], m.settings())
    annotators = build_annotators(cfg["annotators"], device)  # missing weights fail here, before any generation
    extractor = build_feature_extractor(cfg["fid"])
    test = load_test_set(cfg, annotators, batch, run_dir, flame_targets)
    log.info("test set: %d sources x %d targets x %d samples (%d inputs skipped)", len(test.sources),
             len(test.targets), samples, len(test.skipped))
    jobs = {m.name: image_paths(m, test, samples, folders[m.name]) for m in methods}
    missing = {m.name: check_external(m, jobs[m.name]) if isinstance(m, FolderMethod) else 0 for m in methods}
    return Plan(cfg, methods, folders, test, jobs, missing, annotators, extractor, gen_batch, batch, device, seed)


def run_share(plan: Plan, share: Share) -> tuple[Scores, dict[str, dict[str, int]]]:
    """Generate this share's missing images, then score its images; returns the scores and what was done."""
    mine = {m.name: share.slice([(job, path) for job, path in plan.jobs[m.name] if path is not None], plan.batch)
            for m in plan.methods}  # a part generates the images it scores
    done: dict[str, dict[str, int]] = {m.name: {"generated": 0} for m in plan.methods}
    for m in plan.methods:
        if isinstance(m, Arc2FaceMethod):
            done[m.name]["generated"] = generate_missing(m, plan.test, plan.folders[m.name],
                                                         [job for job, _ in mine[m.name]], plan.gen_batch, plan.seed,
                                                         share)
    scores = {m.name: score_images(m.name, mine[m.name], plan.test, plan.annotators, plan.extractor, plan.batch,
                                   plan.device) for m in plan.methods}
    for name, (rows, _, _) in scores.items():
        done[name]["scored"] = len(rows)
    return scores, done


def summarise_suite(plan: Plan, scores: Scores) -> SuiteResult:
    """FID's real set, then every method's summary with intervals from its scores."""
    real = real_features(plan.cfg["fid"], plan.test, plan.extractor, plan.batch, plan.device)
    rows: list[dict[str, Any]] = []
    expression, summary, counts = {}, {}, {}
    for m in plan.methods:
        m_rows, expression[m.name], fake = scores[m.name]
        summary[m.name] = summarise(m_rows, real, fake, plan.cfg["fid"], plan.seed)
        counts[m.name] = {"images": len(m_rows), "missing": plan.missing[m.name]}
        rows += m_rows
    return SuiteResult(plan.test, pd.DataFrame(rows), expression, summary, counts)


def run_suite(cfg: Mapping[str, Any], run_dir: Path, device: str = "cpu", seed: int = 0,
              array: Mapping[str, Any] | None = None) -> SuiteResult | dict[str, Any]:
    """Generate what is missing for every method, then score all images and summarise per method. With
    ``array.size`` > 1: one part of that work (``array.index``; returns its progress), or the merge of the parts'
    scores (``merge``), or every part in turn and then the merge (null) (eval/array.py)."""
    from blendexp.data.array import check_index
    from blendexp.eval.array import run_array

    if array and check_index(array)[0] > 1:
        return run_array(plan_suite(cfg, run_dir, device, seed), run_dir, array)
    plan = plan_suite(cfg, run_dir, device, seed)
    return summarise_suite(plan, run_share(plan, Share())[0])
