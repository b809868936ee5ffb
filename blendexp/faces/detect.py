"""Face detection behind one small protocol: MTCNN (weights ship with facenet-pytorch) or SCRFD (insightface ONNX).

Every detector returns ``Face`` records with five landmarks in insightface order, as seen in
the image: left eye, right eye, nose, left mouth corner, right mouth corner. Alignment, the
identity crop and the SMIRK crop all consume that one record, whichever detector made it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

# Detector file names found in antelopev2 / buffalo packs, most specific first.
DETECTOR_FILES: tuple[str, ...] = ("scrfd_10g_bnkps.onnx", "det_10g.onnx")
DETECTOR_GLOBS: tuple[str, ...] = ("scrfd*.onnx", "det_*.onnx")
MODEL_LAYOUT = (
    "models/antelopev2/{scrfd_10g_bnkps.onnx or det_10g.onnx} (SCRFD detector) next to "
    "{glintr100.onnx or arcface.onnx} (ArcFace recogniser); get the antelopev2 pack from "
    "insightface's model zoo and Arc2Face's arcface.onnx from the FoivosPar/Arc2Face Hugging Face repo"
)
DEFAULT_MIN_SCORE: dict[str, float] = {"mtcnn": 0.9, "insightface": 0.5}
MTCNN_MAX_SIDE = 1600  # px: larger photos are shrunk for MTCNN (faces the detector keeps are far above its minimum)


@dataclass(frozen=True, eq=False)  # numpy fields: compare by identity, not element-wise
class Face:
    """One detected face; the unit that alignment, identity and expression crops consume."""

    bbox: np.ndarray  # (4,) float32, x1 y1 x2 y2 in pixels
    score: float
    landmarks5: np.ndarray  # (5, 2) float32: left eye, right eye, nose, left mouth, right mouth (image left/right)
    dense: np.ndarray | None = None  # (478, 2) float32 face-mesh points (landmarks.FaceMesh), where they were found

    @property
    def area(self) -> float:
        """Box area, used to pick the main subject when several faces are found."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that finds faces in an RGB image; lets the builder swap MTCNN for SCRFD via config."""

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Return every face found, best score first (empty list when there is none)."""
        ...


def ensure_rgb(image: np.ndarray) -> np.ndarray:
    """Return (H, W, 3) uint8 RGB, accepting grayscale and RGBA, so callers need not pre-check images."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {arr.dtype}; convert floats with (x * 255).round()")
    return np.ascontiguousarray(arr[:, :, :3])


def largest_face(faces: Sequence[Face]) -> Face | None:
    """Pick the biggest box, the convention Arc2Face uses for the subject of a photo."""
    return max(faces, key=lambda f: f.area) if faces else None


def ort_providers(device: str) -> list[str | tuple[str, dict[str, str]]]:
    """Map a torch-style device string to ONNX Runtime providers so both backends share one config key."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'")


def ort_session_kwargs(device: str, threads: int | None = None) -> dict[str, Any]:
    """Session arguments for insightface's loader: providers, and with ``threads`` a capped intra-op pool, so a
    worker process given one core does not spread onto the others (ONNX Runtime uses every core by default)."""
    kwargs: dict[str, Any] = {"providers": ort_providers(device)}
    if threads:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = int(threads)
        kwargs["sess_options"] = options
    return kwargs


def _sorted_faces(boxes: np.ndarray, scores: np.ndarray, points: np.ndarray, min_score: float) -> list[Face]:
    """Build ``Face`` records above ``min_score``, best first, so all backends order results alike."""
    faces = [
        Face(bbox=b.astype(np.float32), score=float(s), landmarks5=p.reshape(5, 2).astype(np.float32))
        for b, s, p in zip(boxes, scores, points)
        if float(s) >= min_score
    ]
    return sorted(faces, key=lambda f: -f.score)


class MTCNNDetector:
    """MTCNN from facenet-pytorch: needs no download (weights ship in the package), the offline fallback."""

    def __init__(self, min_score: float = DEFAULT_MIN_SCORE["mtcnn"], min_face_size: int = 20, device: str = "cpu"):
        """Build the three-stage cascade with the bundled weights on ``device``."""
        import torch
        from facenet_pytorch import MTCNN

        self.min_score = float(min_score)
        self.min_face_size = int(min_face_size)
        self.model = MTCNN(keep_all=True, min_face_size=self.min_face_size, device=torch.device(device))
        self.model.eval()

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Detect faces; images smaller than the minimum face size have none (MTCNN would crash on them)."""
        img = ensure_rgb(image_rgb)
        if min(img.shape[:2]) < self.min_face_size:
            return []
        scale = min(1.0, MTCNN_MAX_SIDE / max(img.shape[:2]))  # a 6000 px photo: seconds, not a minute
        if scale < 1.0:
            import cv2

            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        boxes, probs, points = self.model.detect(img, landmarks=True)
        if boxes is None:
            return []
        # facenet-pytorch returns object arrays under numpy 2; restack them as float arrays.
        boxes_f = np.stack([np.asarray(b, dtype=np.float32) for b in boxes]) / scale
        points_f = np.stack([np.asarray(p, dtype=np.float32) for p in points]) / scale
        probs_f = np.asarray(probs, dtype=np.float32)
        return _sorted_faces(boxes_f, probs_f, points_f, self.min_score)


def find_detector_onnx(model_dir: str | Path) -> Path | None:
    """Locate the SCRFD file in an antelopev2-style folder (or its ``models`` parent); None if absent."""
    root = Path(model_dir)
    for folder in (root, root / "antelopev2"):
        if not folder.is_dir():
            continue
        for name in DETECTOR_FILES:
            if (folder / name).is_file():
                return folder / name
        for pattern in DETECTOR_GLOBS:
            hits = sorted(folder.glob(pattern))
            if hits:
                return hits[0]
    return None


class InsightFaceDetector:
    """SCRFD through insightface's own loader: the detector Arc2Face used, when its weights are present."""

    def __init__(
        self,
        model_dir: str | Path,
        min_score: float = DEFAULT_MIN_SCORE["insightface"],
        det_size: tuple[int, int] = (640, 640),
        device: str = "cpu",
        threads: int | None = None,
    ):
        """Load the detector ONNX from ``model_dir``; raise FileNotFoundError naming what is missing."""
        from insightface.model_zoo import get_model

        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"face model folder {folder} does not exist; expected layout: {MODEL_LAYOUT}")
        path = find_detector_onnx(folder)
        if path is None:
            raise FileNotFoundError(
                f"no SCRFD detector ONNX ({' or '.join(DETECTOR_FILES)}) in {folder}; expected layout: {MODEL_LAYOUT}"
            )
        self.path = path
        self.min_score = float(min_score)
        self.det_size = (int(det_size[0]), int(det_size[1]))
        self.model = get_model(str(path), **ort_session_kwargs(device, threads))
        if getattr(self.model, "taskname", None) != "detection" or not getattr(self.model, "use_kps", False):
            raise ValueError(f"{path} is not an SCRFD detector with 5 keypoints (insightface gave {self.model!r})")
        self.model.prepare(ctx_id=0, det_thresh=self.min_score, input_size=self.det_size)
        logger.info("loaded SCRFD detector %s", path)

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Detect faces; SCRFD takes BGR (it swaps channels itself), so the RGB input is reversed first."""
        bgr = np.ascontiguousarray(ensure_rgb(image_rgb)[:, :, ::-1])
        det, kpss = self.model.detect(bgr, input_size=self.det_size, det_thresh=self.min_score)
        if det.shape[0] == 0:
            return []
        return _sorted_faces(det[:, :4], det[:, 4], kpss, self.min_score)


def build_detector(
    name: str = "auto",
    model_dir: str | Path | None = None,
    min_score: float | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> FaceDetector:
    """Build the configured detector: ``insightface``, ``mtcnn`` or ``auto`` (SCRFD if its ONNX exists, else MTCNN)."""
    if name == "auto":
        if model_dir is not None and find_detector_onnx(model_dir) is not None:
            name = "insightface"
        else:
            reason = "no model_dir given" if model_dir is None else f"no SCRFD ONNX under {model_dir}"
            logger.info("face detector: MTCNN fallback (%s; expected layout: %s)", reason, MODEL_LAYOUT)
            name = "mtcnn"
    if name == "mtcnn":
        score = DEFAULT_MIN_SCORE["mtcnn"] if min_score is None else min_score
        logger.info("face detector: MTCNN (facenet-pytorch bundled weights), min_score=%.2f", score)
        return MTCNNDetector(min_score=score, device=device)
    if name in ("insightface", "scrfd"):
        if model_dir is None:
            raise ValueError(f"detector {name!r} needs model_dir; expected layout: {MODEL_LAYOUT}")
        score = DEFAULT_MIN_SCORE["insightface"] if min_score is None else min_score
        detector = InsightFaceDetector(model_dir, min_score=score, device=device, threads=threads)
        logger.info("face detector: SCRFD %s, min_score=%.2f", detector.path, score)
        return detector
    raise ValueError(f"unknown face detector {name!r}; choose 'auto', 'insightface' (alias 'scrfd') or 'mtcnn'")
