"""SMIRK's expression encoder: image -> 55-d FLAME vector (50 expression, 2 eyelid, 3 jaw) for the Expression Adapter.

The module mirrors SMIRK's ``ExpressionEncoder`` attribute for attribute (``encoder`` is the
timm MobileNetV3 backbone, ``expression_layers`` the linear head), so the official
``SMIRK_em1.pt`` loads after stripping ``smirk_encoder.expression_encoder.`` and toy-trained
encoders saved here load in the official code. Crops follow SMIRK's demo / Arc2Face's
``run_smirk``: a square around the face extent, enlarged 1.4x, warped to 224 px, RGB in [0, 1].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from blendexp.checkpoints import load_weights_only
from blendexp.faces.detect import Face, FaceDetector, ensure_rgb, largest_face
from blendexp.faces.landmarks import smirk_region
from blendexp.flame import EXP_DIM, EYELIDS, JAW, N_EXPRESSION

logger = logging.getLogger(__name__)

SMIRK_PREFIX = "smirk_encoder.expression_encoder."
SMIRK_BACKBONE = "tf_mobilenetv3_large_minimal_100"
SMIRK_INPUT_SIZE = 224
SMIRK_CROP_SCALE = 1.4
SMIRK_HINT = "download SMIRK_em1.pt from the SMIRK repository (georgeretsi/smirk) into models/smirk/"
JAW_SIDE_LIMIT = 0.2  # SMIRK clamps the two sideways jaw rotations to +-0.2 rad
MIN_LANDMARKS = 20  # fewer points (e.g. 5) span eyes-to-mouth only and would give a far too tight crop


class SmirkExpressionEncoder(nn.Module):
    """SMIRK's expression branch, built without pretrained weights (they come from ``load_smirk``)."""

    def __init__(self) -> None:
        """Create backbone and head under SMIRK's attribute names so checkpoints map key for key."""
        super().__init__()
        self.encoder = timm.create_model(SMIRK_BACKBONE, pretrained=False, features_only=True)
        feature_dim = self.encoder.feature_info[-1]["num_chs"]  # 960
        self.expression_layers = nn.Sequential(nn.Linear(feature_dim, EXP_DIM))
        # SMIRK starts from a damped head so an untrained encoder predicts a near-neutral face.
        with torch.no_grad():
            self.expression_layers[-1].weight.mul_(0.1)
            self.expression_layers[-1].bias.mul_(0.1)

    def predict_params(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return SMIRK's output dict for (N, 3, 224, 224) RGB in [0, 1], as the official code consumes it."""
        features = self.encoder(img)[-1]
        pooled = F.adaptive_avg_pool2d(features, 1).flatten(1)
        raw = self.expression_layers(pooled)  # (N, 55)
        jaw = raw[:, JAW]
        return {
            "expression_params": raw[:, :N_EXPRESSION],
            "eyelid_params": raw[:, EYELIDS].clamp(0.0, 1.0),
            "jaw_params": torch.cat([F.relu(jaw[:, :1]), jaw[:, 1:].clamp(-JAW_SIDE_LIMIT, JAW_SIDE_LIMIT)], dim=1),
        }

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Return the (N, 55) FLAME vector in the shard contract's order (expression, eyelids, jaw)."""
        out = self.predict_params(img)
        return torch.cat([out["expression_params"], out["eyelid_params"], out["jaw_params"]], dim=1)


def save_smirk_checkpoint(model: SmirkExpressionEncoder, path: str | Path) -> Path:
    """Write weights under SMIRK's key prefix so toy-trained encoders ship in the official file format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {SMIRK_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def load_smirk(path: str | Path, device: str = "cpu") -> SmirkExpressionEncoder:
    """Load the expression encoder from a SMIRK checkpoint (official or ours) safely, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SMIRK checkpoint not found at {path}; {SMIRK_HINT}")
    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a SMIRK checkpoint (a dict of tensors), got {type(checkpoint).__name__}")
    state = {k[len(SMIRK_PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(SMIRK_PREFIX)}
    if not state:
        sample = list(checkpoint)[:5]
        raise ValueError(f"{path} has no keys starting with {SMIRK_PREFIX!r} (first keys: {sample}); {SMIRK_HINT}")
    model = SmirkExpressionEncoder()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Checkpoints from older torch may lack BatchNorm's step counters; they do not affect inference.
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match SMIRK's expression encoder: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.to(device).eval()


def smirk_crop_matrix(face_region: np.ndarray, scale: float = SMIRK_CROP_SCALE) -> np.ndarray:
    """2x3 affine taking the image to SMIRK's 224 px crop: a square of side ``scale`` x mean extent around the face."""
    region = np.asarray(face_region, dtype=np.float64)
    if region.shape == (4,):
        left, top, right, bottom = region
    elif region.ndim == 2 and region.shape[1] >= 2 and region.shape[0] >= MIN_LANDMARKS:
        left, top = region[:, :2].min(axis=0)
        right, bottom = region[:, :2].max(axis=0)
    else:
        raise ValueError(
            f"face_region must be an xyxy box (4,) or dense landmarks (K>={MIN_LANDMARKS}, 2), got {region.shape}; "
            "pass the detector's box rather than its five points"
        )
    size = int((right - left + bottom - top) / 2 * scale)
    if size <= 0:
        raise ValueError(f"empty face region {region.tolist()}")
    cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
    s = (SMIRK_INPUT_SIZE - 1) / size  # crop corners map to pixel centres 0 and 223, as in SMIRK
    return np.array([[s, 0.0, s * (size / 2 - cx)], [0.0, s, s * (size / 2 - cy)]])


def prepare_smirk_input(
    image_rgb: np.ndarray, face_region: np.ndarray, scale: float = SMIRK_CROP_SCALE, swap_rb: bool = False
) -> torch.Tensor:
    """Crop like SMIRK's demo into (1, 3, 224, 224) RGB in [0, 1]; ``swap_rb`` mimics Arc2Face's run_smirk (BGR out)."""
    img = ensure_rgb(image_rgb)
    matrix = smirk_crop_matrix(face_region, scale)
    size = (SMIRK_INPUT_SIZE, SMIRK_INPUT_SIZE)
    # Bilinear on float then truncation, as skimage's warp(preserve_range=True).astype(uint8) does.
    crop = cv2.warpAffine(img.astype(np.float32), matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    crop = crop.astype(np.uint8)
    if swap_rb:
        crop = crop[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0


class SmirkAnnotator:
    """Detector + SMIRK crop + encoder: FLAME vectors for a batch of images, None where no face is found."""

    def __init__(
        self,
        detector: FaceDetector,
        encoder: SmirkExpressionEncoder,
        scale: float = SMIRK_CROP_SCALE,
        swap_rb: bool = False,
        batch_size: int = 16,
    ):
        """Keep the parts; the encoder is used on whatever device its parameters live on."""
        self.detector = detector
        self.encoder = encoder.eval()
        self.scale = scale
        self.swap_rb = swap_rb
        self.batch_size = int(batch_size)

    def _find_face(self, index: int, image: np.ndarray) -> Face | None:
        """Largest face of one image, or None (logged) when detection finds nothing or fails."""
        try:
            face = largest_face(self.detector.detect(image))
        except (ValueError, RuntimeError) as err:
            logger.warning("image %d: face detection failed (%s); no FLAME vector", index, err)
            return None
        if face is None:
            logger.warning("image %d: no face found; no FLAME vector", index)
        return face

    @torch.no_grad()
    def annotate(
        self, images: Sequence[np.ndarray], faces: Sequence[Face | None] | None = None
    ) -> list[np.ndarray | None]:
        """Return one (55,) float32 vector per image (None where no face); pass ``faces`` to reuse detections."""
        if faces is not None and len(faces) != len(images):
            raise ValueError(f"got {len(faces)} faces for {len(images)} images")
        found = [faces[i] if faces is not None else self._find_face(i, im) for i, im in enumerate(images)]
        todo = [i for i, f in enumerate(found) if f is not None]
        results: list[np.ndarray | None] = [None] * len(images)
        device = next(self.encoder.parameters()).device
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            batch = torch.cat([prepare_smirk_input(images[i], smirk_region(found[i]), self.scale, self.swap_rb)
                               for i in idx])
            exp = self.encoder(batch.to(device)).cpu().numpy().astype(np.float32)
            for row, i in enumerate(idx):
                results[i] = exp[row].copy()
        return results
