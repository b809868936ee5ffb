"""FFHQ alignment and the ArcFace crop: exact geometry on synthetic marks, and on a real photo re-detected."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from blendexp.faces.align import align_ffhq, arcface_crop, ffhq_quad
from blendexp.faces.detect import Face, MTCNNDetector

# An upright synthetic face: interocular 80 px, eyes-to-mouth 80 px, centred in an 800 px canvas.
UPRIGHT = np.array([[360.0, 380.0], [440.0, 380.0], [400.0, 420.0], [365.0, 460.0], [435.0, 460.0]])


def _expected_ffhq(size: int) -> np.ndarray:
    """Where the recipe puts left eye, right eye and mouth centre for ``UPRIGHT``, worked by hand.

    x half-width = max(2 * 80, 1.8 * 80) = 160, centre c = eye mid + 0.1 * (0, 80) = (400, 388),
    so the 320 px source square maps to ``size`` px with scale size / 320.
    """
    s = size / 320.0
    c = np.array([400.0, 388.0])
    pts = np.array([UPRIGHT[0], UPRIGHT[1], (UPRIGHT[3] + UPRIGHT[4]) / 2])
    return (pts - c) * s + size / 2 - 0.5  # pixel-centre coordinates


def _marked_canvas(landmarks: np.ndarray) -> np.ndarray:
    """Black canvas with a red dot on the left eye, green on the right eye, blue on the mouth centre."""
    canvas = np.zeros((800, 800, 3), np.uint8)
    marks = [landmarks[0], landmarks[1], (landmarks[3] + landmarks[4]) / 2]
    for channel, (x, y) in enumerate(marks):
        layer = np.ascontiguousarray(canvas[:, :, channel])
        cv2.circle(layer, (int(round(x * 16)), int(round(y * 16))), 4 * 16, 255, -1, lineType=cv2.LINE_AA, shift=4)
        canvas[:, :, channel] = layer
    return canvas


def _centroids(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted centre of each colour channel's dot."""
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    out = []
    for channel in range(3):
        w = image[:, :, channel].astype(np.float64)
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


@pytest.mark.parametrize("angle", [0.0, 30.0, -75.0])
@pytest.mark.parametrize("size", [256, 512])
def test_ffhq_geometry_is_exact_and_rotation_invariant(angle: float, size: int) -> None:
    rot = cv2.getRotationMatrix2D((420.0, 390.0), angle, 1.0)
    landmarks = UPRIGHT @ rot[:, :2].T + rot[:, 2]
    out = align_ffhq(_marked_canvas(landmarks), landmarks, size=size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    # Sub-pixel: the warp itself is exact; the tolerance only covers dot rasterisation and resampling.
    np.testing.assert_allclose(_centroids(out), _expected_ffhq(size), atol=0.35)


def test_ffhq_quad_is_a_square_centred_below_the_eyes() -> None:
    quad = ffhq_quad(UPRIGHT)
    np.testing.assert_allclose(quad, [[240, 228], [240, 548], [560, 548], [560, 228]])


def test_astronaut_aligned_to_ffhq_template(
    mtcnn: MTCNNDetector, astronaut_rgb: np.ndarray, astronaut_face: Face
) -> None:
    size = 512
    aligned = align_ffhq(astronaut_rgb, astronaut_face.landmarks5, size=size)
    assert aligned.shape == (size, size, 3)
    faces = mtcnn.detect(aligned)
    assert len(faces) == 1
    lm = faces[0].landmarks5 / size
    # Where the recipe sends the original detections: the FFHQ template for this face.
    quad = ffhq_quad(astronaut_face.landmarks5)
    edges = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, size - 0.5]], np.float32)
    matrix = cv2.getAffineTransform(quad[:3].astype(np.float32), edges)
    template = (astronaut_face.landmarks5 @ matrix[:, :2].T + matrix[:, 2]) / size
    # MTCNN's landmark noise is a few % of the interocular distance (0.25 * size here): allow 2 % of the
    # image (10 px, 8 % of interocular). A swapped, mirrored or unrotated crop misses by far more.
    np.testing.assert_allclose(lm, template, atol=0.02)
    # Eyes level: 0.015 of the image over a 0.25-wide interocular is under 3.5 degrees of roll.
    assert abs(lm[0, 1] - lm[1, 1]) < 0.015
    # FFHQ's frame: eye midpoint on the vertical centre line, interocular a quarter of the width here.
    assert abs((lm[0, 0] + lm[1, 0]) / 2 - 0.5) < 0.02
    assert abs((lm[1, 0] - lm[0, 0]) - 0.25) < 0.02


def test_rotated_photo_comes_out_upright(mtcnn: MTCNNDetector, astronaut_rgb: np.ndarray) -> None:
    rot = cv2.getRotationMatrix2D((256.0, 256.0), 25.0, 1.0)
    rotated = cv2.warpAffine(astronaut_rgb, rot, (512, 512))
    face = mtcnn.detect(rotated)[0]
    lm = mtcnn.detect(align_ffhq(rotated, face.landmarks5))[0].landmarks5
    roll = np.degrees(np.arctan2(lm[1, 1] - lm[0, 1], lm[1, 0] - lm[0, 0]))
    assert abs(roll) < 5.0, f"aligned face still rolled by {roll:.1f} degrees (input was 25)"


def test_face_at_the_border_is_padded_like_ffhq(mtcnn: MTCNNDetector, astronaut_rgb: np.ndarray) -> None:
    # Cut the photo so the face touches the top-left corner: the FFHQ quad then reaches ~60 px outside.
    corner = np.ascontiguousarray(astronaut_rgb[70:, 175:])
    face = mtcnn.detect(corner)[0]
    assert ffhq_quad(face.landmarks5).min() < -30
    aligned = align_ffhq(corner, face.landmarks5, size=256)
    # FFHQ fills the outside with blurred reflections, never with black borders.
    assert aligned[:16].mean() > 100 and aligned[:, :16].mean() > 100
    # ...and the filled part is smooth: far less detail than the face itself.
    detail = np.abs(np.diff(aligned.astype(np.float32), axis=1)).mean(axis=2)
    assert detail[:20, :20].mean() < 0.5 * detail[96:160, 96:160].mean()


def test_arcface_crop_puts_landmarks_on_the_arcface_template() -> None:
    from insightface.utils.face_align import arcface_dst

    crop = arcface_crop(_marked_canvas(UPRIGHT), UPRIGHT)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    expected = np.array([arcface_dst[0], arcface_dst[1], (arcface_dst[3] + arcface_dst[4]) / 2])
    # The template is fitted in a least-squares sense, so marks land near (not exactly on) it.
    np.testing.assert_allclose(_centroids(crop), expected, atol=2.0)


def test_bad_landmarks_are_rejected() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align_ffhq(image, np.zeros((68, 2)))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        arcface_crop(image, np.full((5, 2), np.nan))
