"""Annotation of one task in a worker process: detect → choose the subject → align → identity → SMIRK → latents.

Stills keep the largest confident face and are rejected when another one is comparable in size; videos track the
largest face of the first frame with a face by IoU. Every dropped image or frame is recorded with its reason.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from blendexp.data.format import FaceSample, encode_sample, make_key, vae_latents
from blendexp.data.inputs import Item, Task, iter_frames
from blendexp.faces.align import align_ffhq, arcface_crop
from blendexp.faces.detect import DEFAULT_MIN_SCORE, Face, MTCNNDetector, build_detector, largest_face
from blendexp.faces.expression import load_smirk, prepare_smirk_input
from blendexp.faces.identity import build_identity_encoder
from blendexp.faces.landmarks import FaceMesh, alignment_points, fork_safe, smirk_region

BUILDER_VERSION = "blendexp.data.build/2"  # 2: subject auto; images below face.min_size are "too small"
log = logging.getLogger(__name__)
REASONS = ("no face", "several faces", "too small", "low score", "decode error", "unreadable")

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


class Annotator:
    """Detector, recogniser, SMIRK and optional VAE, loaded once per worker process."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        """Load every model named in the config; the detector threshold is halved to recognise "low score"."""
        self.cfg, face, device = cfg, cfg["face"], cfg["device"]
        threads = int(cfg["threads_per_worker"])  # in this process too: the vectors must not depend on the cores
        self.detector = build_detector(face["detector"], face.get("model_dir"), device=device, threads=threads)
        kind = "mtcnn" if isinstance(self.detector, MTCNNDetector) else "insightface"
        self.min_score = float(face["min_score"] if face.get("min_score") is not None else DEFAULT_MIN_SCORE[kind])
        self.detector.min_score = self.min_score / 2  # see faces below the bar too, to tell "low score" from "no face"
        self.recogniser = build_identity_encoder(cfg["identity"]["name"], cfg["identity"]["path"], device=device,
                                                 threads=threads)
        self.smirk = load_smirk(cfg["expression"]["smirk"], device=device)
        self.mesh = FaceMesh() if cfg["expression"]["crop"] == "mesh" else None  # checked by the builder
        self.vae = None
        if cfg["latents"].get("vae"):
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(cfg["latents"]["vae"]).to(device).eval()
        self.device = device

    def close(self) -> None:
        """Stop the face mesh's threads."""
        if self.mesh is not None:
            self.mesh.close()

    def run(self, task: Task) -> dict[str, Any]:
        """Annotate one task: encoded samples in input order, rejects and counts."""
        face_cfg = self.cfg["face"]
        out: dict[str, Any] = {"samples": [], "rejects": [], "frames": 0, "face_px": [], "box_crops": 0}
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
                except (PermissionError, IsADirectoryError) as err:  # a file or folder we may not read
                    self._reject(out, item, frame + 1, "unreadable", f"{type(err).__name__}: {err}")
                    break
                except Exception as err:  # noqa: BLE001 - an undecodable file or frame is a reject, never a crash
                    self._reject(out, item, frame + 1, "decode error", f"{type(err).__name__}: {err}")
                    break
                out["frames"] += 1
                if min(image.shape[:2]) < float(face_cfg["min_size"]):  # below any face box the threshold accepts
                    self._reject(out, item, frame, "too small", f"image {image.shape[1]}x{image.shape[0]} px < "
                                 f"face.min_size {face_cfg['min_size']}")
                    continue
                face, reason, detail = choose_face(
                    self.detector.detect(image), self.min_score, float(face_cfg["min_size"]),
                    None if item.video else face_cfg.get("several_faces_ratio"), track, float(video["iou_min"]))
                track = face.bbox if item.video and face is not None else track
                if reason:
                    self._reject(out, item, frame, reason, detail)
                    continue
                if self.mesh is not None:
                    face = self.mesh.attach(image, face)
                    out["box_crops"] += face.dense is None  # the mesh missed it: SMIRK crops around the box
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
                "smirk_crop": "box" if face.dense is None else "mesh", **self.cfg["model_ids"]}
        if not item.video:
            meta["image"] = item.name
        return {"key": make_key(item.source, item.subject, item.name, frame), "meta": meta,
                "aligned": align_ffhq(image, alignment_points(face), int(self.cfg["face"]["size"])),
                "arcface": arcface_crop(image, face.landmarks5),
                "smirk": prepare_smirk_input(image, smirk_region(face), float(ex["crop_scale"]), bool(ex["swap_rb"])),
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
                latents = list(vae_latents(self.vae, np.stack([p["aligned"] for p in pending])))
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
    if int(cfg["num_workers"]) == 0:  # on threads_per_worker threads, as a worker: SMIRK's floats depend on it
        previous = torch.get_num_threads()
        torch.set_num_threads(int(cfg["threads_per_worker"]))
        annotator = Annotator(cfg)
        try:
            yield from ((t, annotator.run(t)) for t in tasks)
        finally:
            annotator.close()
            torch.set_num_threads(previous)
        return
    method = cfg["start_method"]
    if method == "fork" and not fork_safe():  # e.g. an earlier in-process build ran the face mesh here
        log.info("the face mesh ran in this process: workers start from a fork server instead of a fork")
        method = "forkserver"
    with ProcessPoolExecutor(int(cfg["num_workers"]), mp_context=mp.get_context(method), initializer=_init_worker,
                             initargs=(cfg,)) as pool:
        try:
            yield from pool.map(_run_task, tasks)
        except BrokenProcessPool as err:  # a worker killed or crashed: say so rather than wait for it forever
            raise RuntimeError(f"a build worker process died ({err}); finished tasks are kept: run the same command "
                               "again to resume, with num_workers=0 to see the failing input's error") from None
