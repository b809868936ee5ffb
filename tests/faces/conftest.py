"""Shared real photos and one MTCNN instance for the face-annotator tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage.data import astronaut

from blendexp.faces.detect import Face, MTCNNDetector


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """Run these small CPU models on one thread: on a shared CI box, OpenMP's busy-waiting made MTCNN 2-10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
