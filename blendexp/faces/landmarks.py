"""Dense face landmarks: mediapipe's 478-point face mesh, the points the official release crops SMIRK's input from.

Arc2Face's expression code (after SMIRK's demo) runs mediapipe's face landmarker on the photo, takes the extent of
the 478 points, scales it by 1.4 and warps that square to 224 px. ``FaceMesh`` runs the mesh model that ships inside
the mediapipe wheel on a square around a detected face (so the mesh describes that face, in any photo size), and
``ffhq_points`` turns the mesh into the five points FFHQ's alignment rule uses (eye centres from the eye contours,
mouth corners), so a reference photo is aligned the way the official reference path aligns it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import cv2
import numpy as np

from blendexp.faces.detect import Face, ensure_rgb

log = logging.getLogger(__name__)

N_POINTS = 478
SMIRK_CROPS = ("mesh", "box")  # SMIRK's crop around the face mesh (the official release's) or the detector's box
# Mesh indices of the points dlib's 68-point rule (FFHQ's) averages or uses, in image order (left first): the six
# contour points of each eye, the nose tip and the two mouth corners.
LEFT_EYE = (33, 160, 158, 133, 153, 144)
RIGHT_EYE = (362, 385, 387, 263, 373, 380)
NOSE_TIP = 1
MOUTH_CORNERS = (61, 291)
CONTEXT = 2.0  # the mesh runs on a square this many times the detector's box side, centred on the box
MESH_SIZE = 256  # px: larger squares are shrunk to this first (the mesh model itself works at 192 px)
_STARTED = [False]  # whether this process has run a mesh graph (see ``fork_safe``)


def fork_safe() -> bool:
    """Whether processes forked from this one may run the mesh: not once a graph ran here (mediapipe leaves state
    behind, even closed, that corrupts the heap of a forked child that builds its own graph)."""
    return not _STARTED[0]


def check_smirk_crop(crop: str, key: str) -> str:
    """``crop`` if it names a SMIRK crop rule; else an error naming the config ``key`` and the choices."""
    if crop not in SMIRK_CROPS:
        raise ValueError(f"{key}={crop!r}; choose one of {', '.join(SMIRK_CROPS)}")
    return crop


def ffhq_points(dense: np.ndarray) -> np.ndarray:
    """(5, 2) points for FFHQ alignment from a (478, 2) mesh: eye centres, nose tip, mouth corners."""
    dense = np.asarray(dense, np.float64)
    return np.stack([dense[list(LEFT_EYE)].mean(0), dense[list(RIGHT_EYE)].mean(0), dense[NOSE_TIP],
                     dense[MOUTH_CORNERS[0]], dense[MOUTH_CORNERS[1]]]).astype(np.float32)


def alignment_points(face: Face) -> np.ndarray:
    """The five points FFHQ alignment uses: from the mesh where there is one (the official reference path's dense
    rule), else the detector's."""
    return face.landmarks5 if face.dense is None else ffhq_points(face.dense)


def smirk_region(face: Face) -> np.ndarray:
    """What SMIRK's crop is built around: the mesh (the official rule) where there is one, else the detector's box."""
    return face.bbox if face.dense is None else face.dense


def _square(image: np.ndarray, face: Face) -> tuple[np.ndarray, float, np.ndarray]:
    """The square around ``face`` the mesh runs on (edge pixels repeated outside the photo), its scale and origin."""
    x1, y1, x2, y2 = (float(v) for v in face.bbox)
    side = CONTEXT * max(x2 - x1, y2 - y1)
    origin = np.array([(x1 + x2 - side) / 2, (y1 + y2 - side) / 2])
    scale = min(1.0, MESH_SIZE / side)
    out = int(round(side * scale))
    matrix = np.array([[scale, 0.0, -origin[0] * scale], [0.0, scale, -origin[1] * scale]])
    crop = cv2.warpAffine(image, matrix, (out, out), flags=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    return crop, scale, origin


class FaceMesh:
    """mediapipe's face mesh (refined: 478 points, the model bundled in the wheel), one graph per instance."""

    def __init__(self, min_confidence: float = 0.1) -> None:
        """``min_confidence`` as the official landmarker's (0.1), since a detector already found the face; the graph
        is built on first use (mediapipe's imports take a second or two)."""
        self.min_confidence = float(min_confidence)
        self._mesh: Any = None

    def landmarks(self, image_rgb: np.ndarray, face: Face) -> np.ndarray | None:
        """(478, 2) pixel positions of ``face``'s mesh in the image, or None where the mesh finds no face there."""
        if self._mesh is None:
            import mediapipe as mp

            self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                         refine_landmarks=True,
                                                         min_detection_confidence=self.min_confidence)
            _STARTED[0] = True
        crop, scale, origin = _square(ensure_rgb(image_rgb), face)
        found = self._mesh.process(crop).multi_face_landmarks
        if not found:
            return None
        points = np.array([[p.x, p.y] for p in found[0].landmark], np.float64) * crop.shape[1]
        return (points / scale + origin).astype(np.float32)

    def attach(self, image_rgb: np.ndarray, face: Face) -> Face:
        """``face`` with its mesh (``dense``), unchanged (detector box only) when the mesh finds none."""
        dense = self.landmarks(image_rgb, face)
        if dense is None:
            log.debug("face mesh found no face in the detector's box %s", face.bbox.round(1).tolist())
            return face
        return replace(face, dense=dense)

    def close(self) -> None:
        """Free the mediapipe graph (built again if used later)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None
