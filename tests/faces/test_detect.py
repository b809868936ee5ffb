"""Face detection: MTCNN on real photos, SCRFD plumbing through insightface's loader, detector selection."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from blendexp.faces.annotators import build_annotators
from blendexp.faces.detect import (
    Face,
    FaceDetector,
    InsightFaceDetector,
    MTCNNDetector,
    build_detector,
    ensure_rgb,
    largest_face,
)


def test_astronaut_has_one_plausible_face(astronaut_face: Face) -> None:
    x1, y1, x2, y2 = astronaut_face.bbox
    # The face sits in the upper middle of the 512 px portrait and is 60-200 px across.
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 300
    assert 60 < x2 - x1 < 200 and 60 < y2 - y1 < 200
    assert astronaut_face.score > 0.99
    lm = astronaut_face.landmarks5
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    assert np.all((lm >= [x1, y1]) & (lm <= [x2, y2])), "landmarks must lie inside the box"
    left_eye, right_eye, nose, mouth_l, mouth_r = lm
    assert left_eye[0] < right_eye[0] and mouth_l[0] < mouth_r[0], "insightface order is image-left first"
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1]), "eyes above nose above mouth"


def test_group_photo_finds_all_six_people(mtcnn: MTCNNDetector, group_photo_rgb: np.ndarray) -> None:
    faces = mtcnn.detect(group_photo_rgb)
    assert len(faces) == 6
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    # A looser threshold also admits MTCNN's two low-confidence false positives (a hand, a glass).
    loose = MTCNNDetector(min_score=0.8).detect(group_photo_rgb)
    assert len(loose) > 6
    assert largest_face(faces) is max(faces, key=lambda f: f.area)


@pytest.mark.parametrize(
    "image",
    [np.full((256, 256, 3), 128, np.uint8), np.zeros((8, 8, 3), np.uint8)],
    ids=["blank", "smaller-than-min-face"],
)
def test_no_face_gives_empty_list(mtcnn: MTCNNDetector, image: np.ndarray) -> None:
    assert mtcnn.detect(image) == []
    assert largest_face([]) is None


def test_ensure_rgb_accepts_gray_and_rgba_and_rejects_float() -> None:
    assert ensure_rgb(np.zeros((4, 5), np.uint8)).shape == (4, 5, 3)
    assert ensure_rgb(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        ensure_rgb(np.zeros((4, 5, 3), np.float32))


# --- SCRFD through insightface: a fake detector graph with SCRFD's 9-output signature -------------

ANCHOR_ROW, ANCHOR_COL, STRIDE = 5, 5, 32  # the one anchor that fires, on the stride-32 level
BOX_DIST = (2.0, 2.0, 2.0, 2.0)  # left, top, right, bottom distances in stride units
KPS_DIST = ((-0.6, -0.5), (0.6, -0.5), (0.0, 0.1), (-0.5, 0.8), (0.5, 0.8))  # image-left eye first


class FakeSCRFD(nn.Module):
    """Mimics SCRFD's outputs (scores, boxes, keypoints for strides 8/16/32, 2 anchors each) at 640x640.

    It reports one face only when its input is red, i.e. when RGB channel 0 is bright: insightface
    swaps BGR->RGB itself, so an RGB image handed over unswapped would look blue and find nothing.
    """

    def __init__(self) -> None:
        """Constant per-anchor tables; only the firing anchor's score depends on the image."""
        super().__init__()
        for stride in (8, 16, 32):
            n = (640 // stride) ** 2 * 2
            onehot = torch.zeros(n, 1)
            if stride == STRIDE:
                onehot[2 * (ANCHOR_ROW * (640 // stride) + ANCHOR_COL)] = 1.0
            self.register_buffer(f"onehot{stride}", onehot)
            self.register_buffer(f"box{stride}", torch.tensor(BOX_DIST).repeat(n, 1))
            self.register_buffer(f"kps{stride}", torch.tensor(KPS_DIST).flatten().repeat(n, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Scores, then box distances, then keypoint distances, stride by stride, as SCRFD orders them."""
        score = torch.sigmoid(20.0 * (x[:, 0].mean() - x[:, 2].mean()))
        strides = (8, 16, 32)
        scores = [getattr(self, f"onehot{s}") * score for s in strides]
        boxes = [getattr(self, f"box{s}") + 0.0 * score for s in strides]
        kps = [getattr(self, f"kps{s}") + 0.0 * score for s in strides]
        return (*scores, *boxes, *kps)


@pytest.fixture(scope="module")
def fake_antelope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An antelopev2-style folder whose det_10g.onnx is the fake SCRFD graph."""
    folder = tmp_path_factory.mktemp("models") / "antelopev2"
    folder.mkdir()
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(
        FakeSCRFD().eval(), (torch.zeros(1, 3, 640, 640),), str(folder / "det_10g.onnx"),
        dynamo=False, input_names=["input.1"], output_names=names, opset_version=17,
    )
    return folder


def test_scrfd_through_insightface_loader(fake_antelope: Path) -> None:
    detector = build_detector("auto", model_dir=fake_antelope.parent)  # the parent `models` folder also works
    assert isinstance(detector, InsightFaceDetector) and isinstance(detector, FaceDetector)
    red = np.zeros((320, 320, 3), np.uint8)
    red[..., 0] = 255
    faces = detector.detect(red)
    assert len(faces) == 1 and faces[0].score > 0.99
    # The 320 px image is upscaled to 640 px, so anchor coordinates come back halved.
    cx, cy = (ANCHOR_COL * STRIDE / 2, ANCHOR_ROW * STRIDE / 2)
    half = STRIDE / 2
    np.testing.assert_allclose(faces[0].bbox, [cx - 2 * half, cy - 2 * half, cx + 2 * half, cy + 2 * half], atol=1e-3)
    expected_kps = np.array([[cx + dx * half, cy + dy * half] for dx, dy in KPS_DIST])
    np.testing.assert_allclose(faces[0].landmarks5, expected_kps, atol=1e-3)
    blue = red[..., ::-1].copy()
    assert detector.detect(blue) == []


def test_auto_falls_back_to_mtcnn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="blendexp.faces.detect"):
        detector = build_detector("auto", model_dir=tmp_path)
    assert isinstance(detector, MTCNNDetector)
    assert "MTCNN fallback" in caplog.text and str(tmp_path) in caplog.text


def test_missing_detector_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*antelopev2"):
        InsightFaceDetector(missing)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*det_10g.onnx"):
        build_detector("insightface", model_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown face detector"):
        build_detector("dlib")


def test_generated_images_are_detected_at_their_own_scrfd_size(fake_antelope: Path, tmp_path: Path) -> None:
    cfg = {"tiny_root": str(tmp_path), "arcface": "x", "smirk": "x", "detector_dir": str(fake_antelope),
           "smirk_crop": "box"}
    default = build_annotators(cfg)
    assert default.detector.det_size == (640, 640) and default.generated_detector.det_size == (256, 256)
    assert default.generated_detector.model is default.detector.model  # one set of weights
    red = np.zeros((320, 320, 3), np.uint8)
    red[..., 0] = 255
    same = build_annotators({**cfg, "generated_det_size": 640})  # the fake graph only takes 640 px inputs
    assert same.read_generated([red]).found.tolist() == [True] and same.read([red]).found.tolist() == [True]
    assert build_annotators({**cfg, "detector": "mtcnn"}).generated_detector is None  # MTCNN has no input size
