"""Dense landmarks: mediapipe's face mesh on real photos, SMIRK's crop by the official rule, FFHQ points from the mesh,
and the annotators using the mesh for detected photos only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.transform import estimate_transform, warp

from blendexp.faces.annotators import build_annotators
from blendexp.faces.detect import MTCNN_MAX_SIDE, Face, MTCNNDetector
from blendexp.faces.expression import prepare_smirk_input
from blendexp.faces.landmarks import FaceMesh, N_POINTS, alignment_points, ffhq_points, smirk_region


@pytest.fixture(scope="module")
def mesh() -> FaceMesh:
    """One mediapipe graph for these tests."""
    return FaceMesh()


def official_smirk_crop(image: np.ndarray, points: np.ndarray, scale: float = 1.4, size: int = 224) -> np.ndarray:
    """An independent statement of the official rule (SMIRK's demo, Arc2Face's exp_utils): the landmarks' extent,
    its mean side times ``scale``, a similarity transform of that square onto ``size`` px, skimage's bilinear warp."""
    left, top = points.min(axis=0)
    right, bottom = points.max(axis=0)
    side = int((right - left + bottom - top) / 2 * scale)
    cx, cy = right - (right - left) / 2, bottom - (bottom - top) / 2
    corners = np.array([[cx - side / 2, cy - side / 2], [cx - side / 2, cy + side / 2], [cx + side / 2, cy - side / 2]])
    transform = estimate_transform("similarity", corners, np.array([[0, 0], [0, size - 1], [size - 1, 0]]))
    return warp(image, transform.inverse, output_shape=(size, size), preserve_range=True).astype(np.uint8)


def test_mesh_on_real_photos_agrees_with_the_detector(mesh: FaceMesh, mtcnn: MTCNNDetector,
                                                      astronaut_rgb: np.ndarray, group_photo_rgb: np.ndarray) -> None:
    for photo in (astronaut_rgb, group_photo_rgb):
        faces = mtcnn.detect(photo)
        assert faces
        for face in faces:  # every face of the group photo: the mesh describes the face in the detector's box
            dense = mesh.landmarks(photo, face)
            assert dense is not None and dense.shape == (N_POINTS, 2)
            side = float(face.bbox[2] - face.bbox[0])
            # Measured: at most 0.084 of the box side between MTCNN's five points and the mesh's (both are guesses
            # of the same anatomy); 0.15 keeps a margin while a wrong index or face would be off by far more.
            assert np.linalg.norm(ffhq_points(dense) - face.landmarks5, axis=1).max() / side < 0.15


def test_smirk_crop_follows_the_official_rule_on_mesh_points(mesh: FaceMesh, astronaut_rgb: np.ndarray,
                                                             astronaut_face: Face) -> None:
    dense = mesh.landmarks(astronaut_rgb, astronaut_face)
    ours = prepare_smirk_input(astronaut_rgb, dense)[0].permute(1, 2, 0).numpy() * 255
    theirs = official_smirk_crop(astronaut_rgb, dense).astype(np.float64)
    assert np.abs(ours - theirs).mean() < 1.0  # same square, same interpolation; truncation differs by one level
    box_crop = prepare_smirk_input(astronaut_rgb, astronaut_face.bbox)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(box_crop - theirs).mean() > 10  # the box rule is another crop: the choice matters


def test_annotators_use_the_mesh_for_detected_photos_only(tmp_path: Path, astronaut_rgb: np.ndarray) -> None:
    cfg = {"tiny_root": str(tmp_path), "arcface": "x", "smirk": "x", "detector": "mtcnn"}
    default = build_annotators(cfg)
    face = default.find_faces([astronaut_rgb])[0]
    assert face.dense is not None and smirk_region(face) is face.dense
    assert np.abs(alignment_points(face) - ffhq_points(face.dense)).max() == 0
    template = default.find_faces([astronaut_rgb], aligned=True)[0]  # declared aligned crops: the template box
    assert template.dense is None and smirk_region(template) is template.bbox
    box = build_annotators({**cfg, "smirk_crop": "box"}).find_faces([astronaut_rgb])[0]
    assert box.dense is None and alignment_points(box) is box.landmarks5
    readouts = [a.read([astronaut_rgb]).exp[0] for a in (default, build_annotators({**cfg, "smirk_crop": "box"}))]
    assert not np.allclose(*readouts)  # SMIRK saw two different crops
    with pytest.raises(ValueError, match="annotators.smirk_crop='dlib'; choose one of mesh, box"):
        build_annotators({**cfg, "smirk_crop": "dlib"})


def test_large_photos_are_detected_at_a_bounded_size(mtcnn: MTCNNDetector, astronaut_rgb: np.ndarray,
                                                     astronaut_face: Face, monkeypatch: pytest.MonkeyPatch) -> None:
    import cv2

    seen: list[tuple[int, ...]] = []
    detect = mtcnn.model.detect
    monkeypatch.setattr(mtcnn.model, "detect", lambda img, **kw: seen.append(img.shape) or detect(img, **kw))
    big = cv2.resize(astronaut_rgb, (4096, 4096), interpolation=cv2.INTER_CUBIC)
    face = mtcnn.detect(big)[0]
    assert seen == [(MTCNN_MAX_SIDE, MTCNN_MAX_SIDE, 3)]  # MTCNN itself saw a shrunk copy
    np.testing.assert_allclose(face.bbox / 8, astronaut_face.bbox, atol=4)  # found, in the big photo's pixels
