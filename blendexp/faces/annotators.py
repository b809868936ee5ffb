"""The measuring instruments of the evaluation and the pipeline: face detector, ArcFace, a second recogniser, SMIRK.

``Annotators.read`` turns a batch of images into what every metric needs: whether a face was found, its ArcFace
(and facenet) embedding and its SMIRK FLAME vector. With ``tiny_root`` set, random annotators are written there
once in the official file formats (ArcFace ONNX, facenet state dict, SMIRK checkpoint), so the embedded default
runs the real loaders end to end; their scores only check the plumbing.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from blendexp.faces.align import arcface_crop
from blendexp.faces.detect import Face, FaceDetector, InsightFaceDetector, build_detector, ensure_rgb, largest_face
from blendexp.faces.expression import SmirkAnnotator, SmirkExpressionEncoder, load_smirk, save_smirk_checkpoint
from blendexp.faces.identity import IdentityEncoder, build_identity_encoder, export_arcface_onnx
from blendexp.faces.landmarks import FaceMesh, check_smirk_crop
from blendexp.flame import EXP_DIM, ID_DIM

log = logging.getLogger(__name__)

# Five landmarks and the detector box of a face in an FFHQ-aligned crop, as fractions of a 512 px image
# (landmarks: the usual FFHQ template; box: MTCNN on aligned photos).
FFHQ_LANDMARKS = np.array([[192.98, 239.95], [318.90, 240.19], [256.63, 314.02], [201.26, 371.41],
                           [313.09, 371.15]], dtype=np.float32) / 512.0
FFHQ_BOX = np.array([0.23, 0.20, 0.77, 0.90], dtype=np.float32)
TINY_FACENET = "facenet/20180402-114759-vggface2.pt"
WEIGHTS = ("arcface", "facenet", "smirk")


GENERATED = ("auto", "detect", "aligned")
DETECTED_FROM = 128  # px: generated images this size and up are detected (auto); smaller ones are read as aligned


class AlignedFaces:
    """A "detector" for FFHQ-aligned crops (shard images, Arc2Face outputs, toy faces): the face is where the
    alignment put it. Use it where the data declare alignment; it never reports a missing face."""

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """The FFHQ template scaled to this image."""
        h, w = ensure_rgb(image_rgb).shape[:2]
        scale = np.array([w, h], dtype=np.float32)
        return [Face(bbox=FFHQ_BOX * np.tile(scale, 2), score=1.0, landmarks5=FFHQ_LANDMARKS * scale)]


def ensure_tiny_annotators(root: str | Path, facenet: bool = True) -> dict[str, Path]:
    """A random ArcFace ONNX and SMIRK checkpoint (the builder's: tiny shards and tiny scores share one recogniser)
    and, with ``facenet``, a random facenet state dict, each written once (atomically) in its official format."""
    arcface, smirk = Path(root) / "antelopev2" / "arcface.onnx", Path(root) / "smirk" / "SMIRK_em1.pt"
    if not arcface.exists():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, ID_DIM))
        os.replace(export_arcface_onnx(net, arcface.with_name("arcface.tmp.onnx")), arcface)
    if not smirk.exists():
        torch.manual_seed(0)
        os.replace(save_smirk_checkpoint(SmirkExpressionEncoder(), smirk.with_suffix(".tmp")), smirk)
    if not facenet:
        return {"arcface": arcface, "smirk": smirk}
    weights = Path(root) / TINY_FACENET
    if not weights.exists():
        from facenet_pytorch import InceptionResnetV1  # 100 MB of imports the ArcFace/SMIRK pair does not need

        log.info("writing a tiny random facenet to %s (plumbing checks only: its scores mean nothing)", weights)
        torch.manual_seed(0)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(InceptionResnetV1(pretrained=None, classify=False).state_dict(), weights.with_suffix(".tmp"))
        os.replace(weights.with_suffix(".tmp"), weights)
    return {"arcface": arcface, "facenet": weights, "smirk": smirk}


@dataclass
class FaceReadout:
    """What the metrics need from a batch of N images; rows without a face are NaN."""

    found: np.ndarray  # (N,) bool
    arcface: np.ndarray  # (N, 512) unit vectors
    facenet: np.ndarray | None  # (N, 512) unit vectors, None when the cross-model check is off
    exp: np.ndarray  # (N, 55) SMIRK FLAME vectors
    faces: list[Face | None] = field(default_factory=list)  # the detections (for alignment), None where no face


@dataclass
class Annotators:
    """Detector + recognisers + SMIRK, applied together so each image is detected once."""

    detector: FaceDetector
    arcface: IdentityEncoder
    facenet: IdentityEncoder | None
    smirk: SmirkAnnotator
    generated: str = "auto"
    toy: str | None = None  # what the toy or tiny random instruments are, None for real weights
    mesh: FaceMesh | None = None  # dense landmarks for detected faces (SMIRK's crop, FFHQ alignment); None: box crop
    generated_detector: FaceDetector | None = None  # for generated images (SCRFD at the official 256 px); None: same

    def toy_warning(self, what: str) -> str | None:
        """The warning for reading real photos (``what``) with these instruments, None with real weights."""
        return toy_warning(what, self.toy)

    def find_faces(self, images: Sequence[np.ndarray], aligned: bool = False,
                   generated: bool = False) -> list[Face | None]:
        """Largest face per image, None where there is none (a failing detector counts as no face, never a crash);
        ``aligned`` images (shards, declared crops) take the FFHQ template instead of detection; ``generated`` ones
        the generated images' detector."""
        detector = (self.generated_detector or self.detector) if generated else self.detector
        faces: list[Face | None] = []
        for image in images:
            if aligned:
                faces.append(AlignedFaces().detect(image)[0])
                continue
            try:
                face = largest_face(detector.detect(image))
            except (ValueError, RuntimeError) as err:
                log.debug("face detection failed: %s", err)
                face = None
            faces.append(face if face is None or self.mesh is None else self.mesh.attach(image, face))
        return faces

    def generated_aligned(self, images: Sequence[np.ndarray]) -> bool:
        """Whether generated images are read as aligned crops: ``generated`` says so, or (auto) they are smaller than
        any real detector finds faces in (the toy and tiny bases' 64 px); Arc2Face's 512 px outputs are detected."""
        if self.generated != "auto":
            return self.generated == "aligned"
        return bool(images) and min(min(np.shape(i)[:2]) for i in images) < DETECTED_FROM

    def read_generated(self, images: Sequence[np.ndarray]) -> FaceReadout:
        """``read`` for a method's outputs, detected or taken as aligned as ``generated`` says."""
        return self.read(images, aligned=self.generated_aligned(images), generated=True)

    def read(self, images: Sequence[np.ndarray], aligned: bool = False, generated: bool = False) -> FaceReadout:
        """Detect (or, ``aligned``, template), crop and embed a batch: one FaceReadout row per image."""
        n = len(images)
        faces = self.find_faces(images, aligned, generated)
        found = np.array([f is not None for f in faces], dtype=bool)
        arc = np.full((n, ID_DIM), np.nan, np.float32)
        fn = np.full((n, ID_DIM), np.nan, np.float32) if self.facenet is not None else None
        exp = np.full((n, EXP_DIM), np.nan, np.float32)
        idx = np.flatnonzero(found)
        if len(idx):
            crops = np.stack([arcface_crop(images[i], faces[i].landmarks5) for i in idx])
            arc[idx] = self.arcface.embed(crops)
            if self.facenet is not None and fn is not None:
                fn[idx] = self.facenet.embed(crops)
            vectors = self.smirk.annotate([images[i] for i in idx], [faces[i] for i in idx])
            exp[idx] = np.stack([v for v in vectors if v is not None])
        return FaceReadout(found=found, arcface=arc, facenet=fn, exp=exp, faces=faces)


def toy_warning(what: str, toy: str | None) -> str | None:
    """The warning for reading real photos (``what``) with toy instruments (``toy``), None with real weights."""
    if toy is None:
        return None
    return (f"{what} read with {toy}: they were never trained on real faces, so identity and expression values of "
            f"real photos mean nothing; give the real weights (paths.models=<official models folder>)")


def toy_origin(weights: Path) -> str | None:
    """The toy-world build (or its shipped copy, data/toy) a weights file comes from: a parent holding the build's
    metrics.json; None for anything else."""
    for folder in weights.resolve().parents[:4]:
        metrics = folder / "metrics.json"
        if metrics.is_file() and '"identity_encoder"' in metrics.read_text(errors="replace"):
            return str(folder)
    return None


def describe_toy(cfg: Mapping[str, Any], paths: Mapping[str, Any]) -> str | None:
    """Which toy instruments these are ("tiny random ...", "toy-world ... from <root>"), None for real weights."""
    if cfg.get("tiny_root"):
        return f"tiny random ArcFace/SMIRK ({cfg['tiny_root']})"
    roots = {toy_origin(Path(paths[k])) for k in ("arcface", "smirk")}
    roots.discard(None)
    return f"the toy world's ArcFace/SMIRK ({', '.join(sorted(roots))})" if roots else None


def resized(detector: FaceDetector, size: int) -> FaceDetector | None:
    """SCRFD sharing ``detector``'s weights at another input size (the official demo detects generated images at
    256 px); None for detectors without one (MTCNN, aligned crops)."""
    if not isinstance(detector, InsightFaceDetector):
        return None
    other = copy.copy(detector)
    other.det_size = (size, size)
    return other


def build_annotators(cfg: Mapping[str, Any], device: str = "cpu") -> Annotators:
    """Build the configured annotators; ``tiny_root`` replaces the weight paths by tiny random files."""
    paths = {k: cfg.get(k) for k in WEIGHTS}
    if cfg.get("tiny_root"):
        tiny = ensure_tiny_annotators(cfg["tiny_root"], facenet=bool(paths["facenet"]))
        paths = {k: tiny.get(k) for k in WEIGHTS}  # facenet only when asked for: null keeps the check off
    for key in ("arcface", "smirk"):
        if not paths[key]:
            raise ValueError(f"eval.annotators.{key} is not set; give the weights file (or set tiny_root)")
    arcface = build_identity_encoder("arcface", paths["arcface"], device)
    facenet = build_identity_encoder("facenet", paths["facenet"], device) if paths["facenet"] else None
    smirk = load_smirk(paths["smirk"], device)
    generated = str(cfg.get("generated", "auto"))
    if generated not in GENERATED:
        raise ValueError(f"annotators.generated={generated!r}; choose one of {', '.join(GENERATED)}")
    if cfg.get("detector") == "aligned":
        raise ValueError("annotators: detector=aligned is now aligned=true (every photo is an aligned crop; shards "
                         "always are)")
    crop = check_smirk_crop(str(cfg.get("smirk_crop", "mesh")), "annotators.smirk_crop")
    detector: FaceDetector = AlignedFaces() if cfg.get("aligned") else build_detector(
        cfg.get("detector", "auto"), model_dir=cfg.get("detector_dir"), min_score=cfg.get("min_score"), device=device)
    mesh = FaceMesh() if crop == "mesh" and not cfg.get("aligned") else None
    return Annotators(detector=detector, arcface=arcface, facenet=facenet, generated=generated,
                      toy=describe_toy(cfg, paths), mesh=mesh,
                      generated_detector=resized(detector, int(cfg.get("generated_det_size", 256))),
                      smirk=SmirkAnnotator(detector, smirk, swap_rb=bool(cfg.get("smirk_swap_rb", False)),
                                           batch_size=int(cfg.get("batch_size", 16))))
