"""Face crops: FFHQ alignment (what Arc2Face is trained on) and the 112 px ArcFace crop (what recognisers expect).

Both are driven by the five landmarks of ``detect.Face``. The FFHQ recipe (NVlabs
ffhq-dataset) is reproduced with OpenCV: eye centres and the mouth centre define an
oriented square; the image is shrunk if far larger than the output, padded by reflection
with the edge blur FFHQ uses, warped at up to 4x the output size and area-downsampled.
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np

from blendexp.faces.detect import ensure_rgb

ARCFACE_SIZE = 112


def _check_landmarks(landmarks5: np.ndarray) -> np.ndarray:
    """Validate five (x, y) points early so a wrong array fails here, not inside OpenCV."""
    lm = np.asarray(landmarks5, dtype=np.float64)
    if lm.shape != (5, 2) or not np.isfinite(lm).all():
        raise ValueError(f"expected 5 finite landmarks of shape (5, 2), got shape {lm.shape}")
    return lm


def ffhq_quad(landmarks5: np.ndarray) -> np.ndarray:
    """Return the FFHQ crop quad (4, 2) (top-left, bottom-left, bottom-right, top-right) in image pixels."""
    lm = _check_landmarks(landmarks5)
    eye_left, eye_right = lm[0], lm[1]
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[3] + lm[4]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    # x points along the face's horizontal axis, from both the eye line and the (rotated) eye-mouth line.
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def _crop_around(img: np.ndarray, quad: np.ndarray, qsize: float) -> tuple[np.ndarray, np.ndarray]:
    """Drop image regions far from the quad so padding and warping work on the face only (large video frames)."""
    h, w = img.shape[:2]
    border = max(int(round(qsize * 0.1)), 3)
    x0, y0 = np.floor(quad.min(axis=0)).astype(int) - border
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + border
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 - x0 < 2 or y1 - y0 < 2 or (x1 - x0 == w and y1 - y0 == h):
        return img, quad
    return img[y0:y1, x0:x1], quad - np.array([x0, y0], dtype=np.float64)


def _pad_like_ffhq(img: np.ndarray, quad: np.ndarray, qsize: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflect-pad where the quad leaves the image, blurring and flattening the padding as FFHQ does."""
    h, w = img.shape[:2]
    border = max(int(round(qsize * 0.1)), 3)
    lo = np.floor(quad.min(axis=0)).astype(int)
    hi = np.ceil(quad.max(axis=0)).astype(int)
    pad = np.maximum([-lo[0] + border, -lo[1] + border, hi[0] - w + border, hi[1] - h + border], 0)
    if pad.max() <= border - 4:
        return img, quad
    pad = np.maximum(pad, max(int(round(qsize * 0.3)), 1))
    left, top, right, bottom = (int(v) for v in pad)
    out = cv2.copyMakeBorder(img.astype(np.float32), top, bottom, left, right, cv2.BORDER_REFLECT_101)
    hh, ww = out.shape[:2]
    yy, xx = np.ogrid[:hh, :ww]
    # 0 on the original image's edge, rising to 1 at the padded border.
    mask = np.maximum(
        1.0 - np.minimum(xx.astype(np.float32) / left, (ww - 1 - xx).astype(np.float32) / right),
        1.0 - np.minimum(yy.astype(np.float32) / top, (hh - 1 - yy).astype(np.float32) / bottom),
    )[:, :, None]
    blur = max(qsize * 0.02, 0.5)
    blurred = cv2.GaussianBlur(out, (0, 0), sigmaX=blur, sigmaY=blur)
    out += (blurred - out) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    out += (np.median(out, axis=(0, 1)) - out) * np.clip(mask, 0.0, 1.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), quad + np.array([left, top], dtype=np.float64)


def align_ffhq(image_rgb: np.ndarray, landmarks5: np.ndarray, size: int = 512) -> np.ndarray:
    """Warp the face to the FFHQ template at ``size`` px, the framing Arc2Face and the shard contract expect."""
    img = ensure_rgb(image_rgb)
    quad = ffhq_quad(landmarks5)
    qsize = float(np.hypot(*(quad[3] - quad[0])))
    shrink = int(math.floor(qsize / size * 0.5))
    if shrink > 1:
        h, w = img.shape[:2]
        new_w, new_h = max(int(round(w / shrink)), 1), max(int(round(h / shrink)), 1)
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
        quad = (quad + 0.5) * np.array([new_w / w, new_h / h]) - 0.5
        qsize /= shrink
    img, quad = _crop_around(img, quad, qsize)
    img, quad = _pad_like_ffhq(img, quad, qsize)
    # Warp at an integer multiple of the output size, then area-downsample (FFHQ warps at 4096 px).
    factor = int(min(max(math.ceil(qsize / size), 1), 4))
    big = size * factor
    # Output pixel edges (0, 0), (0, big), (big, big) are pixel centres -0.5 / big-0.5 in OpenCV's convention.
    dst = np.array([[-0.5, -0.5], [-0.5, big - 0.5], [big - 0.5, big - 0.5]], dtype=np.float32)
    matrix = cv2.getAffineTransform(quad[:3].astype(np.float32), dst)
    warped = cv2.warpAffine(img, matrix, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    if factor > 1:
        warped = cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)
    return warped


def arcface_crop(image_rgb: np.ndarray, landmarks5: np.ndarray) -> np.ndarray:
    """Crop (112, 112, 3) RGB on ArcFace's five-point template, the input insightface recognisers were trained on."""
    from insightface.utils.face_align import norm_crop

    img = ensure_rgb(image_rgb)
    with warnings.catch_warnings():  # norm_crop calls a scikit-image API deprecated in 0.26; nothing to act on here
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.")
        return norm_crop(img, landmark=_check_landmarks(landmarks5).astype(np.float32), image_size=ARCFACE_SIZE)
