"""Raw images and videos → WebDataset shards in the shard contract: ``python -m blendexp.data.build``.

Per image or sampled video frame: detect faces → choose the subject (stills: the largest confident
face, rejected when another one is comparable in size; videos: the largest face of the first frame
with a face, then the best-IoU face) → FFHQ alignment at ``face.size`` → identity embedding on the
ArcFace crop → SMIRK's 55-d FLAME vector on SMIRK's crop → optional VAE latents → ``encode_sample``.

Inputs are listed in sorted order and cut into tasks (``images_per_task`` images, or one video).
Worker processes annotate tasks; the parent packs their samples *in task order* into
``{source}-{index:06d}.tar`` shards of at most ``shard.maxcount`` samples and ``shard.maxsize`` bytes.
A shard is written under a temporary name and renamed when complete; then a done marker records
where the next shard starts (task, sample offset), and a journal records each task's rejects and
counts. A re-run keeps finished shards and resumes at the first unfinished one; every step is
deterministic (tar mtimes fixed), so the shards are byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import hydra
import numpy as np
import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from blendexp import config as _config  # noqa: F401  (registers the ${blendexp.*} resolvers)
from blendexp.data.datamodule import REMOTE_PREFIXES
from blendexp.data.format import FORMAT_VERSION, FaceSample, encode_sample, make_key
from blendexp.faces.align import align_ffhq, arcface_crop
from blendexp.faces.detect import DEFAULT_MIN_SCORE, Face, MTCNNDetector, build_detector, largest_face
from blendexp.faces.expression import SmirkExpressionEncoder, load_smirk, prepare_smirk_input, save_smirk_checkpoint
from blendexp.faces.identity import build_identity_encoder, export_arcface_onnx

log = logging.getLogger(__name__)
BUILDER_VERSION = "blendexp.data.build/1"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
LIST_EXTS = (".txt", ".lst")
REASONS = ("no face", "several faces", "too small", "low score", "decode error")
TAR_MTIME = 946684800  # 2000-01-01, an int: fixed member times give byte-identical shards (a float adds pax headers)
OUTPUT_KEYS = ("sources", "face", "video", "identity", "expression", "latents", "shard", "images_per_task",
               "shard_name", "shard_url")  # config that changes the shards (the resume fingerprint)
USER_ERRORS = (FileNotFoundError, ValueError, KeyError)
# insightface's norm_crop calls a scikit-image API deprecated in 0.26; harmless, but printed once per worker.
warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")


@dataclass(frozen=True)
class Item:
    """One input file: an image (one sample) or a video (one clip of one tracked subject)."""

    source: str
    path: str  # where it is read from
    rel: str  # recorded in the json: relative to the source's root, so shards do not depend on the machine
    subject: str
    name: str  # clip id (videos) or image name (stills), unique within (source, subject)
    video: bool


@dataclass(frozen=True)
class Task:
    """A unit of work: consecutive images or one video of one source, always cut the same way."""

    source: str
    index: int
    items: tuple[Item, ...]


def safe_part(name: str) -> str:
    """A key part from a file or folder name: keys may hold only letters, digits, '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"


def list_inputs(source: str, src: Mapping[str, Any]) -> list[Item]:
    """The items of one source: a folder (recursive), a glob, one media file, or a list file (path[TAB subject])."""
    spec, rule = src.get("inputs"), src.get("subject", "parent")
    if not spec:
        raise ValueError(f"sources.{source}.inputs is not set; give a folder, glob, media file or list file")
    if rule not in ("parent", "stem"):
        raise ValueError(f"sources.{source}.subject={rule!r}; choose 'parent' (folder name) or 'stem' (file name)")
    media = IMAGE_EXTS + VIDEO_EXTS
    spec_path = Path(str(spec))
    entries: list[tuple[Path, str | None]]
    if any(c in str(spec) for c in "*?["):
        root = Path(re.split(r"[*?\[]", str(spec))[0]).parent
        entries = [(Path(p), None) for p in sorted(glob.glob(str(spec), recursive=True)) if Path(p).is_file()]
    elif spec_path.is_dir():
        root = spec_path
        entries = [(p, None) for p in sorted(spec_path.rglob("*")) if p.is_file() and p.suffix.lower() in media]
    elif spec_path.is_file() and spec_path.suffix.lower() in LIST_EXTS:
        root, entries = spec_path.parent, []
        for line in spec_path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                path, _, subject = line.rstrip("\n").partition("\t")
                entries.append((root / path.strip(), subject.strip() or None))
    elif spec_path.is_file():
        root, entries = spec_path.parent, [(spec_path, None)]
    else:
        raise FileNotFoundError(f"sources.{source}.inputs: {spec} does not exist; expected a folder of images/"
                                f"videos, a glob, a media file or a list file ({'/'.join(LIST_EXTS)})")
    if not entries:
        raise FileNotFoundError(f"sources.{source}.inputs: no images ({' '.join(IMAGE_EXTS)}) or videos "
                                f"({' '.join(VIDEO_EXTS)}) found at {spec}")
    items, seen = [], Counter()
    for path, listed in entries:
        subject = safe_part(listed or (path.parent.name if rule == "parent" else path.stem))
        name = safe_part(path.stem)
        seen[subject, name] += 1
        name = name if seen[subject, name] == 1 else f"{name}-{seen[subject, name]}"
        rel = os.path.relpath(path, root) if path.is_relative_to(root) else str(path)
        items.append(Item(source, str(path), rel, subject, name, path.suffix.lower() in VIDEO_EXTS))
    return items


def plan_tasks(cfg: Mapping[str, Any]) -> dict[str, list[Task]]:
    """Cut every source into tasks deterministically: runs of ``images_per_task`` images, each video alone."""
    if not cfg.get("sources"):
        raise ValueError("no sources configured; add e.g. +sources.photos.inputs=/data/raw/photos")
    plan: dict[str, list[Task]] = {}
    for source, src in cfg["sources"].items():
        if safe_part(source) != source:
            raise ValueError(f"source name {source!r} may hold only letters, digits, '_' and '-'")
        tasks: list[Task] = []
        chunk: list[Item] = []
        for item in list_inputs(source, src):
            if item.video or len(chunk) == int(cfg["images_per_task"]):
                if chunk:
                    tasks.append(Task(source, len(tasks), tuple(chunk)))
                chunk = []
            if item.video:
                tasks.append(Task(source, len(tasks), (item,)))
            else:
                chunk.append(item)
        if chunk:
            tasks.append(Task(source, len(tasks), tuple(chunk)))
        plan[source] = tasks
    return plan


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two xyxy boxes (frame-to-frame tracking)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def choose_face(faces: list[Face], min_score: float, min_size: float, several_ratio: float | None = None,
                track: np.ndarray | None = None, iou_min: float = 0.3) -> tuple[Face | None, str | None, str]:
    """(subject face, reject reason or None, detail). The face comes back even when too small, to keep tracking."""
    if not faces:
        return None, "no face", ""
    good = [f for f in faces if f.score >= min_score]
    if not good:
        return None, "low score", f"best score {max(f.score for f in faces):.3f} < {min_score}"
    if track is None:
        face = largest_face(good)
        ratio = float("inf") if several_ratio is None else several_ratio
        rivals = [f for f in good if f is not face and f.area >= ratio * face.area]
        if rivals:
            return None, "several faces", f"{len(rivals) + 1} faces of comparable size"
    else:
        ious = [box_iou(track, f.bbox) for f in good]
        face = good[int(np.argmax(ious))]
        if max(ious) < iou_min:
            return None, "no face", f"tracked face lost (best IoU {max(ious):.2f} < video.iou_min {iou_min})"
    side = float(min(face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1]))
    if side < min_size:
        return face, "too small", f"face {side:.0f} px < face.min_size {min_size}"
    return face, None, ""


def read_image(path: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB, turned upright by its EXIF orientation like photo viewers do."""
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def iter_frames(item: Item, stride: int, max_frames: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, RGB frame): the image itself, or every ``stride``-th video frame up to ``max_frames``."""
    if not item.video:
        yield 0, read_image(item.path)
        return
    with av.open(item.path) as container:
        taken = 0
        for index, frame in enumerate(container.decode(video=0)):
            if index % stride == 0:
                yield index, frame.to_ndarray(format="rgb24")
                taken += 1
                if max_frames and taken >= max_frames:
                    return


def file_id(kind: str, path: str | Path) -> str:
    """Which model made a vector, as recorded in every sample: kind, file name and content hash."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"{kind}:{Path(path).name}:{digest}"


class Annotator:
    """Detector, recogniser, SMIRK and optional VAE, loaded once per worker process."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Load every model named in the config; the detector threshold is halved to recognise "low score"."""
        self.cfg, face, device = cfg, cfg["face"], cfg["device"]
        self.detector = build_detector(face["detector"], face.get("model_dir"), device=device)
        kind = "mtcnn" if isinstance(self.detector, MTCNNDetector) else "insightface"
        self.min_score = float(face["min_score"] if face.get("min_score") is not None else DEFAULT_MIN_SCORE[kind])
        self.detector.min_score = self.min_score / 2  # see faces below the bar too, to tell "low score" from "no face"
        self.recogniser = build_identity_encoder(cfg["identity"]["name"], cfg["identity"]["path"], device=device)
        self.smirk = load_smirk(cfg["expression"]["smirk"], device=device)
        self.vae = None
        if cfg["latents"].get("vae"):
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(cfg["latents"]["vae"]).to(device).eval()
        self.device = device

    def run(self, task: Task) -> dict[str, Any]:
        """Annotate one task: encoded samples in input order, rejects and counts."""
        face_cfg = self.cfg["face"]
        out: dict[str, Any] = {"samples": [], "rejects": [], "frames": 0, "face_px": []}
        pending: list[dict[str, Any]] = []
        for item in task.items:
            video = {**self.cfg["video"], **self.cfg["sources"][item.source].get("video", {})}
            frames = iter_frames(item, int(video["stride"]), video.get("max_frames"))
            track, frame = None, -1
            while True:
                try:
                    frame, image = next(frames)
                except StopIteration:
                    break
                except Exception as err:  # noqa: BLE001 - an unreadable file or frame is a reject, never a crash
                    self._reject(out, item, frame + 1, "decode error", f"{type(err).__name__}: {err}")
                    break
                out["frames"] += 1
                face, reason, detail = choose_face(
                    self.detector.detect(image), self.min_score, float(face_cfg["min_size"]),
                    None if item.video else face_cfg.get("several_faces_ratio"), track, float(video["iou_min"]))
                track = face.bbox if item.video and face is not None else track
                if reason:
                    self._reject(out, item, frame, reason, detail)
                    continue
                pending.append(self._crops(item, frame, image, face))
                if len(pending) >= int(self.cfg["expression"]["batch_size"]):
                    self._flush(pending, out)
        self._flush(pending, out)
        return out

    @staticmethod
    def _reject(out: dict[str, Any], item: Item, frame: int, reason: str, detail: str) -> None:
        """Record one line of rejects.jsonl: which file and frame (null for stills) was dropped, and why."""
        out["rejects"].append({"source": item.source, "path": item.path, "frame": frame if item.video else None,
                               "reason": reason, "detail": detail})

    def _crops(self, item: Item, frame: int, image: np.ndarray, face: Face) -> dict[str, Any]:
        """Everything later steps need from the full frame, so the frame itself can be dropped right away."""
        ex = self.cfg["expression"]
        meta = {"source": item.source, "subject": item.subject, "clip": item.name if item.video else None,
                "frame": frame, "path": item.rel, "bbox": [round(float(v), 1) for v in face.bbox],
                "score": round(face.score, 4), "builder": BUILDER_VERSION, "size": int(self.cfg["face"]["size"]),
                **self.cfg["model_ids"]}
        if not item.video:
            meta["image"] = item.name
        return {"key": make_key(item.source, item.subject, item.name, frame), "meta": meta,
                "aligned": align_ffhq(image, face.landmarks5, int(self.cfg["face"]["size"])),
                "arcface": arcface_crop(image, face.landmarks5),
                "smirk": prepare_smirk_input(image, face.bbox, float(ex["crop_scale"]), bool(ex["swap_rb"])),
                "side": float(min(face.bbox[2] - face.bbox[0], face.bbox[3] - face.bbox[1]))}

    def _flush(self, pending: list[dict[str, Any]], out: dict[str, Any]) -> None:
        """Run the batched models on the pending crops and encode the samples (batches depend only on the task)."""
        if not pending:
            return
        ids = self.recogniser.embed(np.stack([p["arcface"] for p in pending]))  # (N, 512)
        with torch.no_grad():
            exps = self.smirk(torch.cat([p["smirk"] for p in pending]).to(self.device)).cpu().numpy()  # (N, 55)
            latents = [None] * len(pending)
            if self.vae is not None:
                x = torch.from_numpy(np.stack([p["aligned"] for p in pending])).permute(0, 3, 1, 2).float()
                dist = self.vae.encode((x / 127.5 - 1.0).to(self.device)).latent_dist  # posterior mean: deterministic
                latents = list((dist.mean * self.vae.config.scaling_factor).cpu().numpy())
        for p, id_emb, exp, lat in zip(pending, ids, exps, latents):
            sample = FaceSample(p["key"], p["aligned"], id_emb, exp.astype(np.float32), p["meta"], lat)
            out["samples"].append(encode_sample(sample, int(self.cfg["face"]["jpeg_quality"])))
            out["face_px"].append(p["side"])
        pending.clear()


_WORKER: Annotator | None = None


def _init_worker(cfg: Mapping[str, Any]) -> None:
    """Pool initialiser: one thread per process (parallelism comes from processes), models loaded once."""
    global _WORKER
    torch.set_num_threads(int(cfg["threads_per_worker"]))
    _WORKER = Annotator(cfg)


def _run_task(task: Task) -> tuple[Task, dict[str, Any]]:
    """Pool entry point."""
    assert _WORKER is not None, "worker used before _init_worker"
    return task, _WORKER.run(task)


def annotate(cfg: Mapping[str, Any], tasks: list[Task]) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Results in task order, from ``num_workers`` processes (0: in this process)."""
    if not tasks:
        return
    if int(cfg["num_workers"]) == 0:
        annotator = Annotator(cfg)
        yield from ((t, annotator.run(t)) for t in tasks)
        return
    ctx = mp.get_context(cfg["start_method"])
    with ctx.Pool(int(cfg["num_workers"]), initializer=_init_worker, initargs=(cfg,)) as pool:
        yield from pool.imap(_run_task, tasks, chunksize=1)


def is_remote(url: str) -> bool:
    """Shards written through a command or to an object store cannot be renamed or checked locally."""
    return url.startswith(REMOTE_PREFIXES)


def tar_bytes(sample: Mapping[str, Any]) -> int:
    """Bytes a sample adds to a tar (a 512-byte header plus padded data per member), for ``shard.maxsize``."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in sample.items() if not k.startswith("__"))


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that a killed build leaves either the old or the new version, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ShardPacker:
    """One source's shards: samples in task order, size limits, temp-then-rename, done markers and a journal."""

    def __init__(self, cfg: Mapping[str, Any], source: str, n_tasks: int) -> None:
        """Pick up where an earlier build of the same plan stopped (see the module docstring)."""
        self.cfg, self.source, self.n_tasks = cfg, source, n_tasks
        self.work = Path(cfg["work_dir"])
        self.work.mkdir(parents=True, exist_ok=True)
        self.journal = self.work / f"{source}.journal.jsonl"
        self.markers: list[dict[str, Any]] = []
        while (m := self.work / f"{source}-{len(self.markers):06d}.done").exists():
            info = json.loads(m.read_text())
            if not is_remote(info["url"]) and not Path(info["url"]).is_file():
                break  # a finished shard was deleted since: rebuild from it
            self.markers.append(info)
        self.start: tuple[int, int] = tuple(self.markers[-1]["next"]) if self.markers else (0, 0)  # type: ignore
        done = self.work / f"{source}.complete"
        if done.exists() and json.loads(done.read_text())["shards"] == len(self.markers):
            self.start = (n_tasks, 0)
        lines = self.journal.read_text().splitlines() if self.journal.exists() else []
        reports = [json.loads(line) for line in lines if line.endswith("}")]  # a killed write leaves half a line
        self.reports = {r["task"]: r for r in reports if r["task"] < self.start[0]}
        write_atomic(self.journal, "".join(json.dumps(self.reports[t]) + "\n" for t in sorted(self.reports)))
        self.writer: Any = None
        self.tmp = Path()
        self.count = self.size = 0

    @property
    def complete(self) -> bool:
        """All tasks are packed and every shard is closed."""
        return self.start[0] >= self.n_tasks

    def url(self, index: int) -> str:
        """Where shard ``index`` goes: ``shard_url`` (any URL webdataset writes, e.g. pipe:) or ``out/shard_name``."""
        pattern = self.cfg["shard_url"] or str(Path(self.cfg["out"]) / self.cfg["shard_name"])
        return pattern.format(source=self.source, index=index)

    def _open(self) -> None:
        """Start the next shard under a temporary local name."""
        url = self.url(len(self.markers))
        self.tmp = (self.work / f"{self.source}-{len(self.markers):06d}.tar") if is_remote(url) else Path(url)
        self.tmp = self.tmp.with_name(self.tmp.name + ".tmp")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.writer = wds.TarWriter(str(self.tmp), encoder=False, mtime=TAR_MTIME)

    def _close(self, next_start: tuple[int, int]) -> None:
        """Finish the open shard: rename (or upload) it, then write its done marker naming where the next starts."""
        self.writer.close()
        self.writer = None
        url = self.url(len(self.markers))
        if is_remote(url):
            with open(self.tmp, "rb") as src, wds.gopen(url, "wb") as dst:
                shutil.copyfileobj(src, dst)
            self.tmp.unlink()
        else:
            os.replace(self.tmp, url)
        info = {"url": url, "count": self.count, "bytes": self.size, "next": list(next_start)}
        write_atomic(self.work / f"{self.source}-{len(self.markers):06d}.done", json.dumps(info))
        self.markers.append(info)
        self.start, self.count, self.size = next_start, 0, 0

    def add(self, task: Task, result: Mapping[str, Any]) -> None:
        """Append a task's samples (skipping those already in finished shards) and journal its report."""
        maxcount, maxsize = int(self.cfg["shard"]["maxcount"]), float(self.cfg["shard"]["maxsize"])
        for k, sample in enumerate(result["samples"]):
            if (task.index, k) < self.start:
                continue
            size = tar_bytes(sample)
            if self.writer is not None and (self.count >= maxcount or self.size + size > maxsize):
                self._close((task.index, k))
            if self.writer is None:
                self._open()
            self.writer.write(sample)
            self.count, self.size = self.count + 1, self.size + size
        metas = [json.loads(s["json"]) for s in result["samples"]]
        report = {"task": task.index, "inputs": len(task.items), "frames": result["frames"],
                  "rejects": result["rejects"], "face_px": result["face_px"],
                  "subjects": Counter(m["subject"] for m in metas),
                  "clips": Counter(f"{m['subject']}/{m['clip']}" for m in metas if m["clip"] is not None)}
        self.reports[task.index] = report
        with self.journal.open("a") as f:
            f.write(json.dumps(report) + "\n")
        if task.index == self.n_tasks - 1:
            self.finish()

    def finish(self) -> None:
        """Close the last shard and mark the source complete once every task is packed."""
        if self.writer is not None:
            self._close((self.n_tasks, 0))
        if len(self.reports) == self.n_tasks:
            write_atomic(self.work / f"{self.source}.complete", json.dumps({"shards": len(self.markers)}))
            self.start = (self.n_tasks, 0)


def brace_form(urls: list[str]) -> str:
    """``a-{000000..000012}.tar`` for consecutive shard URLs: the form data configs and webdataset accept."""
    if len(urls) < 2:
        return urls[0] if urls else ""
    a, b = urls[0], urls[-1]
    i, j = len(os.path.commonprefix([a, b])), len(os.path.commonprefix([a[::-1], b[::-1]]))
    while i > 0 and a[i - 1].isdigit():
        i -= 1
    while j > 0 and a[len(a) - j].isdigit():
        j -= 1
    return f"{a[:i]}{{{a[i:len(a) - j]}..{b[i:len(b) - j]}}}{a[len(a) - j:]}"


def check_plan(cfg: Mapping[str, Any], plan: dict[str, list[Task]]) -> None:
    """Refuse to resume a build made from other inputs or settings (unless ``overwrite``), then record this plan."""
    def stat(path: str) -> list[int]:
        """Size and mtime, so edited inputs change the fingerprint (-1 for a missing file)."""
        try:
            st = os.stat(path)
        except OSError:
            return [-1, -1]
        return [st.st_size, st.st_mtime_ns]

    inputs = [[i.path, *stat(i.path)] for tasks in plan.values() for t in tasks for i in t.items]
    settings = {k: cfg.get(k) for k in OUTPUT_KEYS} | {"model_ids": cfg["model_ids"], "builder": BUILDER_VERSION}
    fingerprint = hashlib.sha256(json.dumps([settings, inputs], sort_keys=True).encode()).hexdigest()
    work = Path(cfg["work_dir"])
    path = work / "plan.json"
    if path.exists() and json.loads(path.read_text())["fingerprint"] != fingerprint:
        if not cfg["overwrite"]:
            raise ValueError(f"{cfg['out']} holds a build made from other inputs or settings (see {path}); re-run "
                             "with overwrite=true to discard it, or choose another out=")
        for marker in work.glob("*.done"):
            url = json.loads(marker.read_text())["url"]
            if not is_remote(url):
                Path(url).unlink(missing_ok=True)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=2, sort_keys=True))


def write_reports(cfg: Mapping[str, Any], packers: dict[str, ShardPacker], elapsed: float) -> dict[str, Any]:
    """manifest.json (shards and counts per source, subject, clip), rejects.jsonl and stats.json in ``out``."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "builder": BUILDER_VERSION,
                                "image_size": int(cfg["face"]["size"]), "models": cfg["model_ids"], "sources": {}}
    stats: dict[str, Any] = {"elapsed_s": round(elapsed, 2), "num_workers": cfg["num_workers"], "sources": {}}
    rejects: list[str] = []
    for source, packer in packers.items():
        reports = [packer.reports[t] for t in sorted(packer.reports)]
        subjects, clips, reasons = Counter(), Counter(), Counter()
        for r in reports:
            subjects.update(r["subjects"])
            clips.update(r["clips"])
            reasons.update(x["reason"] for x in r["rejects"])
            rejects += [json.dumps(x) + "\n" for x in r["rejects"]]
        urls = [m["url"] for m in packer.markers]
        samples = sum(m["count"] for m in packer.markers)
        px = [v for r in reports for v in r["face_px"]]
        manifest["sources"][source] = {"shards": urls, "brace": brace_form(urls), "samples": samples,
                                       "subjects": dict(sorted(subjects.items())), "clips": dict(sorted(clips.items()))}
        stats["sources"][source] = {
            "inputs": sum(r["inputs"] for r in reports), "frames": sum(r["frames"] for r in reports),
            "samples": samples, "shards": len(urls), "bytes": sum(m["bytes"] for m in packer.markers),
            "rejects": {k: reasons[k] for k in REASONS if reasons[k]},
            "face_px": {"min": min(px), "median": float(np.median(px)), "max": max(px)} if px else None}
        if not samples:
            log.warning("source %s produced no samples; see %s", source, out / "rejects.jsonl")
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    write_atomic(out / "rejects.jsonl", "".join(rejects))
    write_atomic(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True))
    return {"out": str(out), "manifest": manifest, "stats": stats}


def render_toy(toy: Mapping[str, Any]) -> Path:
    """Render toy-world stills (PNG) and clips (MP4 + ground-truth .npz) as builder inputs; skipped when done."""
    from blendexp.toyworld.params import sample_identity
    from blendexp.toyworld.video import make_clip, render_stills, write_clip

    out, spec = Path(toy["out"]), json.dumps(dict(toy), sort_keys=True)
    marker = out / ".complete"
    if marker.exists() and marker.read_text() == spec:
        return out
    shutil.rmtree(out, ignore_errors=True)
    subject, size, strength = 0, int(toy["size"]), float(toy["nuisance"])
    for split in ("stills", "videos", "val"):
        part = toy[split]
        for _ in range(int(part["subjects"])):
            rng = np.random.default_rng([int(toy["seed"]), subject])
            identity, folder = sample_identity(rng), out / split / f"s{subject:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            if split == "videos":
                for c in range(int(part["clips"])):
                    clip = make_clip(identity, rng, int(part["frames"]), size, float(part["fps"]),
                                     nuisance_strength=strength)
                    write_clip(clip, folder, f"c{c:02d}")
            else:
                for i, (image, _) in enumerate(render_stills(identity, rng, int(part["per_subject"]), size,
                                                             nuisance_strength=strength)):
                    image.save(folder / f"{i:03d}.png")
            subject += 1
    for path in out.rglob("*"):  # fixed times: a re-render keeps the resume fingerprint of an earlier build
        os.utime(path, (TAR_MTIME, TAR_MTIME))
    marker.write_text(spec)
    log.info("toy-world inputs rendered to %s", out)
    return out


def ensure_tiny_annotators(folder: str | Path) -> tuple[Path, Path]:
    """A random ArcFace ONNX and SMIRK checkpoint in the official formats, for offline builds (written once)."""
    arcface, smirk = Path(folder) / "antelopev2" / "arcface.onnx", Path(folder) / "smirk" / "SMIRK_em1.pt"
    if not arcface.exists():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 512))
        os.replace(export_arcface_onnx(net, arcface.with_name("arcface.tmp.onnx")), arcface)
    if not smirk.exists():
        torch.manual_seed(0)
        os.replace(save_smirk_checkpoint(SmirkExpressionEncoder(), smirk.with_suffix(".tmp")), smirk)
    return arcface, smirk


def resolve_models(cfg: dict[str, Any]) -> None:
    """Fill null annotator paths with tiny random ones (when ``tiny_annotators`` is set) and record model ids."""
    if cfg["identity"]["path"] is None or cfg["expression"]["smirk"] is None:
        if not cfg.get("tiny_annotators"):
            raise ValueError("identity.path and expression.smirk must name model files (or set tiny_annotators="
                             "<folder> to use tiny random ones, for tests and toy data only)")
        arcface, smirk = ensure_tiny_annotators(cfg["tiny_annotators"])
        cfg["identity"]["path"] = cfg["identity"]["path"] or str(arcface)
        cfg["expression"]["smirk"] = cfg["expression"]["smirk"] or str(smirk)
    for what, path in (("identity.path", cfg["identity"]["path"]), ("expression.smirk", cfg["expression"]["smirk"])):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what}: model file {path} does not exist; expected layout: models/antelopev2/"
                                    "arcface.onnx and models/smirk/SMIRK_em1.pt (see README 'Real scale')")
    cfg["model_ids"] = {"id_model": file_id(cfg["identity"]["name"], cfg["identity"]["path"]),
                        "exp_model": file_id("smirk", cfg["expression"]["smirk"])}
    if cfg["latents"].get("vae"):
        weights = sorted(Path(cfg["latents"]["vae"]).glob("diffusion_pytorch_model.*"))
        if not weights:
            raise FileNotFoundError(f"latents.vae: no diffusion_pytorch_model.* in {cfg['latents']['vae']}; "
                                    "point it at an AutoencoderKL folder such as <sd15>/vae")
        cfg["model_ids"]["latents_model"] = file_id("vae", weights[0])


def build(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Build (or resume) every configured source's shards and write the reports; returns manifest and stats."""
    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    c.pop("hydra", None)
    if int(c["video"]["stride"]) < 1 or int(c["shard"]["maxcount"]) < 1:
        raise ValueError("video.stride and shard.maxcount must be >= 1")
    if c.get("toy"):
        render_toy(c["toy"])
    plan = plan_tasks(c)
    resolve_models(c)
    check_plan(c, plan)
    packers = {source: ShardPacker(c, source, len(tasks)) for source, tasks in plan.items()}
    todo = [t for s, tasks in plan.items() for t in tasks if t.index >= packers[s].start[0]]
    done = sum(len(tasks) for tasks in plan.values()) - len(todo)
    if done:
        log.info("resuming: %d of %d tasks are already in finished shards", done, done + len(todo))
    start = time.perf_counter()
    with tqdm(total=sum(len(t.items) for t in todo), desc="build", unit="input", disable=None) as bar:
        for task, result in annotate(c, todo):
            packers[task.source].add(task, result)
            bar.update(len(task.items))
    for packer in packers.values():
        packer.finish()
    return write_reports(c, packers, time.perf_counter() - start)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="build")
def main(cfg: DictConfig) -> None:
    """Hydra entry; user errors become one clear line and exit status 1 instead of a traceback."""
    try:
        result = build(cfg)
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"blendexp: shards in {result['out']} (manifest.json, rejects.jsonl, stats.json)")
    for source, info in result["manifest"]["sources"].items():
        st = result["stats"]["sources"][source]
        print(f"  {source}: {info['samples']} samples from {st['inputs']} inputs in {st['shards']} shards "
              f"{info['brace']}; rejected: {st['rejects'] or 'none'}")


if __name__ == "__main__":
    main()
