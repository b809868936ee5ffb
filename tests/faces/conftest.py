"""Shared real photos and one MTCNN instance for the face-annotator tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage.data import astronaut

from blendexp.faces.detect import Face, MTCNNDetector
from tests.conftest import single_torch_thread_fixture


single_torch_thread = single_torch_thread_fixture()


@pytest.fixture(scope="session")
def mtcnn() -> MTCNNDetector:
    """One detector for the whole session; building it reloads the bundled weights."""
    return MTCNNDetector()


@pytest.fixture(scope="session")
def astronaut_rgb() -> np.ndarray:
    """A real single-person portrait shipped with scikit-image (Eileen Collins, 512x512)."""
    return astronaut()


@pytest.fixture(scope="session")
def astronaut_face(mtcnn: MTCNNDetector, astronaut_rgb: np.ndarray) -> Face:
    """The astronaut's detection, computed once and reused by alignment and expression tests."""
    faces = mtcnn.detect(astronaut_rgb)
    assert len(faces) == 1
    return faces[0]


@pytest.fixture(scope="session")
def group_photo_rgb() -> np.ndarray:
    """insightface's bundled group photo t1.jpg (six people), as RGB."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"cannot read {path}"
    return np.ascontiguousarray(bgr[:, :, ::-1])
