"""Procedural toy faces whose identity and FLAME-layout expression are known exactly.

No face data or pretrained weights can be downloaded here, so annotators and diffusion models
are trained and measured on these faces. Geometry lives in *face space*: ``u`` is the
horizontal offset from the frame centre (+u is the subject's left, i.e. the image right) and
``v`` the height as a fraction of the frame (0 = top); at neutral pose the eyes sit at v=0.40
and the mouth at v=0.70, like an aligned crop. A smooth 2.5D warp (head-shaped depth, 3D
rotation, orthographic projection) maps face space to the image, so pose nuisances move
features plausibly while everything is still drawn by cv2 (anti-aliased polygons on a
supersampled RGBA canvas, box-downsampled). Which expression index does what: params.py.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from PIL import Image

from blendexp.flame import EXP_DIM, MAPPED_COMPONENTS, ComponentInfo, check_vector
from blendexp.toyworld.params import (
    HAIR_STYLES,
    IDENTITY_DIM,
    RGB,
    Identity,
    Nuisance,
    neutral_expression,
    sample_expression,
    sample_identity,
    sample_nuisance,
)

__all__ = [  # the toy world's public API; the parameter types live in params.py
    "IDENTITY_DIM", "MAPPED_COMPONENTS", "ComponentInfo", "Identity", "Nuisance", "neutral_expression",
    "region_masks", "render_face", "sample_expression", "sample_identity", "sample_nuisance",
]  # fmt: skip

EYE_Y, MOUTH_Y, CHEEK_V, HEAD_TOP = 0.40, 0.70, 0.47, 0.10
# Amplitudes large enough to read at 64 px after a VAE round trip (a corner lift of 0.035 was 2 px there, and the
# toy SMIRK read smiles and brows no better than the mean predictor).
CORNER_LIFT, CORNER_OUT, PUCKER_NARROW, STRETCH_WIDEN = 0.07, 0.024, 0.525, 0.375
JAW_TOP = MOUTH_Y - 0.05  # nothing above this line moves with the jaw
JAW_DROP, JAW_SHIFT, JAW_TILT = 0.065, 0.0675, 0.4  # tilt: drop per unit u at |jaw.2| = 0.2 (a shear)
BROW_LIFT, BROW_LOWER, FURROW_DROP, FURROW_IN = 0.07, 0.036, 0.04, 0.036
PUFF, PUFF_V, NOSTRIL_FLARE, NOSE_LIFT = 0.12, 0.60, 0.75, 0.024
SHADE = 0.8  # skin brightening (+) / darkening (-) at full strength where a component moves the skin
CORNER_PATCH = (0.045, 0.065, 0.05)  # the smile's patch: offset outwards from the corner, u and v radii (larger
# than the first (0.035, 0.045, 0.035): more of a smile's change survives the VAE, experiments/toy_readability)
BROW_PATCH = 1.3  # the brow's patch: u radius in eye sizes


# ----------------------------------------------------------------------------------- geometry
_T = np.linspace(0.0, 1.0, 25)  # curve parameter across mouth, eyes and brows
_BULGE = np.sin(np.pi * _T)
_ANG = np.linspace(0.0, 2 * np.pi, 40, endpoint=False)
_CIRCLE = np.stack([np.cos(_ANG), np.sin(_ANG)], 1)


def _pts(u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """(N, 2) face-space points from coordinate arrays."""
    u, v = np.broadcast_arrays(np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64))
    return np.stack([u, v], 1)


def _ellipse(cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    """Ellipse outline as a polygon, so it bends with the pose warp like everything else."""
    return _CIRCLE * (ru, rv) + (cu, cv)


def _band(u: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Closed polygon between two curves sampled at the same u (lips, lids, brows)."""
    return np.concatenate([_pts(u, top), _pts(u, bottom)[::-1]])


def _box(u0: float, v0: float, u1: float, v1: float) -> np.ndarray:
    """Densely sampled rectangle, so region masks follow the same curved warp as the drawing."""
    corners = np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1], [u0, v0]])
    t = np.linspace(0.0, 1.0, 12, endpoint=False)[:, None]
    return np.concatenate([a + (b - a) * t for a, b in zip(corners[:-1], corners[1:])])


def _col(rgb: RGB | np.ndarray, k: float = 1.0, add: float = 0.0) -> tuple[int, int, int, int]:
    """Opaque RGBA uint8 drawing colour from a [0, 1] colour, scaled by ``k`` plus ``add`` levels."""
    c = np.clip(np.asarray(rgb, dtype=np.float64) * 255.0 * k + add, 0, 255)
    return int(c[0]), int(c[1]), int(c[2]), 255


def _warp(pts: np.ndarray, nz: Nuisance) -> np.ndarray:
    """Face space -> image fractions through a head-shaped depth map and a 3D rotation (pose nuisance)."""
    u, v = pts[:, 0], pts[:, 1] - 0.5
    z = 0.2 * np.clip(1 - (u / 0.34) ** 2 - (v / 0.45) ** 2, 0, None) ** 2 - 0.1
    z = z + 0.04 * np.exp(-((u / 0.035) ** 2) - ((v - 0.06) / 0.07) ** 2)  # the nose sticks out
    cy, sy, cp, sp, cr, sr = (math.cos(nz.yaw), math.sin(nz.yaw), math.cos(nz.pitch), math.sin(nz.pitch),
                              math.cos(nz.roll), math.sin(nz.roll))  # fmt: skip
    x1, y1, z1 = u, cp * v - sp * z, sp * v + cp * z  # pitch about the horizontal axis
    x2, y2 = cy * x1 + sy * z1, y1  # yaw about the vertical axis
    x3, y3 = cr * x2 - sr * y2, sr * x2 + cr * y2  # roll in the image plane
    return np.stack([0.5 + nz.dx + nz.scale * x3, 0.5 + nz.dy + nz.scale * y3], 1)


class _Drawing:
    """Face-space primitives collected first, so the pose warp runs once per face (speed)."""

    def __init__(self) -> None:
        """Start an empty, back-to-front list of primitives."""
        self.items: list[tuple[np.ndarray, tuple[int, ...], float, bool]] = []

    def poly(self, pts: np.ndarray, colour: tuple[int, ...]) -> None:
        """Queue a filled polygon."""
        self.items.append((pts, colour, 0.0, False))

    def line(self, pts: np.ndarray, colour: tuple[int, ...], width: float, closed: bool = False) -> None:
        """Queue a polyline of ``width`` frame fractions."""
        self.items.append((pts, colour, width, closed))

    def render(self, canvas: np.ndarray, nz: Nuisance) -> None:
        """Warp all points in one batch and draw them anti-aliased (4 fractional bits) onto ``canvas``."""
        side = canvas.shape[0]
        allpts = _warp(np.concatenate([it[0] for it in self.items]), nz) * side * 16
        chunks = np.split(np.rint(allpts).astype(np.int32), np.cumsum([len(it[0]) for it in self.items])[:-1])
        for (_, colour, width, closed), p in zip(self.items, chunks):
            if width == 0.0:
                cv2.fillPoly(canvas, [p], colour, cv2.LINE_AA, 4)
            else:
                thick = max(1, round(width * side * nz.scale))
                cv2.polylines(canvas, [p], closed, colour, thick, cv2.LINE_AA, 4)


# ------------------------------------------------------------------------------------ features
def _controls(expression: np.ndarray) -> dict[str, float]:
    """Mapped components clipped to their ranges and scaled to [-1, 1], the units the drawing uses."""
    out = {}
    for idx, info in MAPPED_COMPONENTS.items():
        x = min(max(float(expression[idx]), info.low), info.high)
        out[info.name] = x / info.high if x >= 0 else x / -info.low
    return out


def _smoothstep(x: np.ndarray) -> np.ndarray:
    """C1 ramp from 0 to 1, so the jaw bends the face outline without a kink."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _move_jaw(pts: np.ndarray, c: dict[str, float], w: np.ndarray) -> np.ndarray:
    """Lower-jaw motion weighted per point, shared by chin outline and lower lip: drop, shift, one-sided tilt."""
    u = pts[:, 0] + JAW_SHIFT * c["jaw_sideways"] * w
    return _pts(u, pts[:, 1] + (JAW_DROP * c["jaw_open"] + JAW_TILT * c["jaw_roll"] * pts[:, 0]) * w)


def _face_outline(idn: Identity, c: dict[str, float]) -> np.ndarray:
    """Head outline: elliptic cranium, superellipse lower face, puffed cheeks, moving jaw."""
    w, e = idn.face_width, 2.0 / idn.jaw_roundness
    a = np.linspace(np.pi, 2 * np.pi, 24, endpoint=False)
    upper = _pts(w * np.cos(a), CHEEK_V + (CHEEK_V - HEAD_TOP) * np.sin(a))
    b = np.linspace(0.0, np.pi, 33)
    cb, sb = np.cos(b), np.sin(b)
    lower = _pts(w * np.sign(cb) * np.abs(cb) ** e, CHEEK_V + (idn.face_height - CHEEK_V) * sb**e)
    pts = np.concatenate([upper, lower])
    pts[:, 0] *= 1 + PUFF * c["cheek_puff"] * np.exp(-(((pts[:, 1] - PUFF_V) / 0.08) ** 2))
    return _move_jaw(pts, c, _smoothstep((pts[:, 1] - JAW_TOP) / (idn.face_height - JAW_TOP)))


def _hair_arc(idn: Identity, grow: float) -> np.ndarray:
    """Top of the head from image-left to image-right, ``grow`` beyond the skull (hair volume)."""
    a = np.linspace(np.pi, 2 * np.pi, 24)
    return _pts((idn.face_width + grow) * np.cos(a), CHEEK_V + (CHEEK_V - HEAD_TOP + grow) * np.sin(a))


def _fringe_v(idn: Identity) -> float:
    """Lowest point of a fringe: just above the highest a raised brow can reach (keeps brows visible)."""
    return EYE_Y - idn.brow_height - 0.012 - BROW_LIFT - idn.brow_thickness / 2 - 0.015


def _hair_back(d: _Drawing, idn: Identity) -> None:
    """Hair behind the head (long, bob, curly volume)."""
    style, w, col = HAIR_STYLES[idn.hair_style], idn.face_width, _col(idn.hair)
    if style in ("long", "fringe"):
        low, side = (1.2, 0.08) if style == "long" else (0.68, 0.045)
        d.poly(np.concatenate([_hair_arc(idn, side - 0.01), [[w + side, low], [-w - side, low]]]), col)
    elif style == "curly":
        for k, a in enumerate(np.linspace(np.pi - 0.6, 2 * np.pi + 0.6, 17)):
            cu, cv = (w + 0.035) * math.cos(a), CHEEK_V + (CHEEK_V - HEAD_TOP + 0.02) * math.sin(a)
            d.poly(_ellipse(cu, cv, 0.065, 0.065), _col(idn.hair, 0.85 if k % 2 else 1.0))


def _hair_front(d: _Drawing, idn: Identity) -> None:
    """Hair cap over the cranium with a per-style hairline (bald heads get a shine instead)."""
    style, w = HAIR_STYLES[idn.hair_style], idn.face_width
    if style == "bald":
        d.poly(_ellipse(-0.3 * w, HEAD_TOP + 0.06, 0.06, 0.025), _col(idn.skin, 1.08, 8))
        return
    if style == "fringe":
        f = _fringe_v(idn)
        line = [(1.0, 0.5), (0.96, f - 0.04), (0.85, f), (0.3, f + 0.004)]
        line += [(-x, y) for x, y in line[::-1]]
    elif style == "curly":
        uu = np.linspace(1.0, -1.0, 15)
        line = [(1.0, 0.42), *zip(uu * 0.9, 0.2 + 0.015 * np.abs(np.sin(uu * 9)) + 0.08 * uu**4), (-1.0, 0.42)]
    else:
        part = 0.02 if style == "long" else 0.0
        line = [(1.0, 0.42), (0.93, 0.30), (0.6, 0.21), (0.15, 0.19 + part)]
        line += [(0.0, 0.19 - part)] + [(-x, y) for x, y in line[::-1]]
    hairline = np.asarray(line, dtype=np.float64) * (w, 1.0)
    d.poly(np.concatenate([_hair_arc(idn, 0.02), hairline]), _col(idn.hair))


def _eye(d: _Drawing, idn: Identity, sgn: int, closure: float) -> None:
    """Almond eye whose upper lid descends to the lower lid as ``closure`` goes 0 -> 1."""
    cu, ew = sgn * idn.eye_spacing, idn.eye_size
    eh = ew * idn.eye_aspect
    u = cu - ew + 2 * ew * _T
    rest, lower = EYE_Y - eh * _BULGE**0.8, EYE_Y + 0.7 * eh * _BULGE**0.9
    upper = rest + (lower - rest) * closure
    d.line(_pts(u[3:-3], rest[3:-3] - 0.011), _col(idn.skin, 0.8), 0.003)  # crease
    d.poly(_band(u, rest, upper), _col(idn.skin, 0.93))  # lid
    d.poly(_band(u, upper, lower), (242, 240, 234, 255))  # sclera
    r = 0.8 * eh
    discs = ((0.0, r, _col(idn.eye)), (0.0, 0.45 * r, (15, 12, 12, 255)), (0.35 * r, 0.2 * r, (250, 250, 250, 255)))
    for off, rad, colour in discs:  # iris, pupil, glint, clipped to the open lids
        disc = _ellipse(cu + off, EYE_Y - off, rad, rad)
        disc[:, 1] = np.clip(disc[:, 1], np.interp(disc[:, 0], u, upper), np.interp(disc[:, 0], u, lower))
        d.poly(disc, colour)
    d.line(_pts(u, upper), _col(idn.hair, 0.3), 0.009)  # lashes
    d.line(_pts(u[2:-2], lower[2:-2]), _col(idn.skin, 0.72), 0.002)


def _brow(d: _Drawing, idn: Identity, sgn: int, lift: float, furrow: float) -> None:
    """Brow arc: raised/lowered as a whole, inner end pulled down and in by the furrow."""
    inner, outer = sgn * (idn.eye_spacing - 0.9 * idn.eye_size), sgn * (idn.eye_spacing + 1.15 * idn.eye_size)
    u = inner + (outer - inner) * _T - sgn * FURROW_IN * furrow * (1 - _T) ** 2
    arch = 0.012 * np.sin(np.pi * (0.15 + 0.8 * _T))
    dv = (BROW_LIFT if lift > 0 else BROW_LOWER) * lift * (0.7 + 0.3 * _T) - FURROW_DROP * furrow * (1 - _T) ** 1.5
    v = EYE_Y - idn.brow_height - arch - dv
    half = idn.brow_thickness * (1 - 0.4 * _T) / 2
    d.poly(_band(u, v - half, v + half), _col(idn.hair, 0.8))


def _nose(d: _Drawing, idn: Identity, wrinkle: float) -> None:
    """Nose bridge shadow, tip, wings and nostrils; the wrinkle flares/lifts them and creases the bridge."""
    nw, ny, skin = idn.nose_width * (1 + NOSTRIL_FLARE * wrinkle), idn.nose_length - NOSE_LIFT * wrinkle, idn.skin
    d.line(_pts([-0.02, -0.022, -nw * 0.6], [EYE_Y + 0.03, ny - 0.06, ny - 0.022]), _col(skin, 0.88), 0.004)
    for sgn in (-1, 1):
        d.poly(_ellipse(sgn * nw * 0.72, ny - 0.01, 0.016, 0.011), _col(skin, 0.86))
    d.poly(_ellipse(0.0, ny - 0.014, nw * 0.5, 0.014), _col(skin, 1.03, 4))
    for sgn in (-1, 1):
        d.poly(_ellipse(sgn * nw * 0.42, ny - 0.003, 0.010, 0.0055), _col(skin, 0.45))
    if wrinkle > 0:  # bridge creases fade in with the coefficient
        crease = _pts(np.linspace(-0.022, 0.022, 5), EYE_Y + 0.03 - 0.003 * np.sin(np.linspace(0, np.pi, 5)))
        for k in range(3):
            d.line(crease + (0.0, 0.009 * k), _col(skin, 1 - 0.5 * wrinkle), 0.005)


def _shade(d: _Drawing, skin: RGB, cu: float, cv: float, ru: float, rv: float, k: float) -> None:
    """Skin patch lit (``k`` > 0) or shadowed (``k`` < 0) by a movement: an area a small encoder reads, where a
    moved edge of a few pixels is not (the toy SMIRK read lifted corners and brows no better than the mean)."""
    if k:
        d.poly(_ellipse(cu, cv, ru, rv), _col(skin, 1 + SHADE * k, 20 * max(k, 0.0)))


def _mouth(d: _Drawing, idn: Identity, c: dict[str, float]) -> None:
    """Lips from two independent corners, pucker/stretch and the jaw-driven opening with teeth."""
    pk = c["lip_pucker"]
    mw = idn.mouth_width * (1 - PUCKER_NARROW * max(pk, 0.0) + STRETCH_WIDEN * max(-pk, 0.0))
    tu = idn.lip_thickness * (1 + 0.6 * max(pk, 0.0) - 0.35 * max(-pk, 0.0))
    sr, sl = c["smile_right"], c["smile_left"]
    ur, vr = -(mw + CORNER_OUT * max(sr, 0.0)), MOUTH_Y - CORNER_LIFT * sr
    ul, vl = mw + CORNER_OUT * max(sl, 0.0), MOUTH_Y - CORNER_LIFT * sl
    for sgn, k, cu, cv_ in ((-1, sr, ur, vr), (1, sl, ul, vl)):  # a lifted cheek catches light, a drop shades
        off, ru, rv = CORNER_PATCH
        _shade(d, idn.skin, cu + sgn * off, cv_ + 0.01, ru, rv, k)
    t, b = _T, _BULGE**0.6
    u = ur + (ul - ur) * t
    seam = vr * (1 - t) * (1 - 2 * t) + MOUTH_Y * 4 * t * (1 - t) + vl * t * (2 * t - 1)
    inner_low = _move_jaw(_pts(u, seam), c, _BULGE)
    outer_low = _move_jaw(_pts(u, seam + 1.3 * tu * b), c, _BULGE)
    if c["jaw_open"] > 0:
        gap = inner_low[:, 1] - seam
        d.poly(np.concatenate([_pts(u, seam), inner_low[::-1]]), (70, 22, 28, 255))
        d.poly(_band(u, seam, seam + np.minimum(0.45 * gap, 0.014 * b)), (236, 232, 220, 255))
    d.poly(np.concatenate([inner_low, outer_low[::-1]]), _col(idn.lip))
    d.poly(_band(u, seam - tu * b * (1 - 0.3 * np.exp(-(((t - 0.5) / 0.07) ** 2))), seam), _col(idn.lip, 0.88))
    d.line(_pts(u, seam), _col(idn.lip, 0.55), 0.003)
    for sgn, k, cu, cv_ in ((-1, sr, ur, vr), (1, sl, ul, vl)):
        if k > 0:  # smile lines fade in with the corner lift
            fold = _pts(cu + sgn * np.array([0.018, 0.026, 0.024]), cv_ + np.array([-0.045, -0.015, 0.012]))
            d.line(fold, _col(idn.skin, 1 - 0.28 * k), 0.004)


def _glasses(d: _Drawing, idn: Identity) -> None:
    """Round or square frames with bridge and arms (static; lenses are clear)."""
    es, ew, col = idn.eye_spacing, idn.eye_size, _col(idn.glasses_rgb)
    p = 2.0 if idn.glasses == 1 else 5.0
    rim = np.sign(_CIRCLE) * np.abs(_CIRCLE) ** (2 / p) * (1.4 * ew, 1.05 * ew)
    for sgn in (-1, 1):
        d.line(rim + (sgn * es, EYE_Y), col, 0.006, closed=True)
        d.line(_pts([sgn * (es + 1.4 * ew), sgn * idn.face_width * 0.98], [EYE_Y - 0.01, EYE_Y - 0.015]), col, 0.005)
    d.line(_pts([-(es - 1.4 * ew), 0.0, es - 1.4 * ew], [EYE_Y - 0.008, EYE_Y - 0.016, EYE_Y - 0.008]), col, 0.005)


def _draw_face(idn: Identity, c: dict[str, float]) -> _Drawing:
    """All primitives of one face, back to front."""
    d, w, skin = _Drawing(), idn.face_width, idn.skin
    nk = 0.52 * w
    shoulders = _pts([-0.7, -0.6, -1.05 * w, -nk, 0.0], [1.3, 0.97, 0.915, 0.9, 0.99])
    d.poly(np.concatenate([shoulders, shoulders[-2::-1] * (-1, 1)]), _col(idn.shirt))
    _hair_back(d, idn)
    d.poly(_pts([-nk, nk, 1.05 * nk, -1.05 * nk], [0.6, 0.6, 1.0, 1.0]), _col(skin, 0.86))
    d.poly(_ellipse(0.0, idn.face_height + 0.005, 0.5 * w, 0.035), _col(skin, 0.7))
    for sgn in (-1, 1):
        d.poly(_ellipse(sgn * 0.97 * w, EYE_Y + 0.055, 0.5 * idn.ear_size, idn.ear_size), _col(skin, 0.93))
        d.poly(_ellipse(sgn * 0.99 * w, EYE_Y + 0.055, 0.25 * idn.ear_size, 0.6 * idn.ear_size), _col(skin, 0.78))
    d.poly(_face_outline(idn, c), _col(skin))
    if c["cheek_puff"] > 0:
        for sgn in (-1, 1):
            glow = _col(skin, 1 + 0.1 * c["cheek_puff"], 14 * c["cheek_puff"])
            d.poly(_ellipse(sgn * 0.74 * w, PUFF_V - 0.05, 0.045, 0.035), glow)
    _mouth(d, idn, c)
    _nose(d, idn, c["nose_wrinkle"])
    for sgn, side in ((1, "left"), (-1, "right")):  # a raised brow opens the lid to the light, a lowered one shades
        _shade(d, skin, sgn * idn.eye_spacing, EYE_Y - idn.eye_size * idn.eye_aspect - 0.025, BROW_PATCH * idn.eye_size, 0.025,
               c[f"brow_{side}"])
    _shade(d, skin, 0.0, EYE_Y - idn.brow_height + 0.01, 0.025, 0.02, -c["brow_furrow"])  # the furrow's shadow
    for sgn, side in ((1, "left"), (-1, "right")):
        _eye(d, idn, sgn, c[f"eyelid_{side}"])
        _brow(d, idn, sgn, c[f"brow_{side}"], c["brow_furrow"])
    if c["brow_furrow"] > 0:
        brow_v = EYE_Y - idn.brow_height
        for sgn in (-1, 1):  # glabella lines
            line = _pts([sgn * 0.011, sgn * 0.013], [brow_v - 0.004, brow_v + 0.022])
            d.line(line, _col(skin, 1 - 0.45 * c["brow_furrow"]), 0.004)
    _hair_front(d, idn)
    if idn.glasses:
        _glasses(d, idn)
    return d


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in frame fractions, for lighting and background gradients."""
    x = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(x, x)


def render_face(
    identity: Identity, expression: np.ndarray, nuisance: Nuisance | None = None, size: int = 128
) -> Image.Image:
    """Deterministic RGB face of ``identity`` showing ``expression`` (55,), the toy world's camera."""
    if not 32 <= size <= 2048:
        raise ValueError(f"size={size} is outside 32..2048 px")
    nz = nuisance or Nuisance.none()
    c = _controls(check_vector(expression, EXP_DIM, "expression"))
    ss = max(2, math.ceil(512 / size))  # supersampling: >= 512 px canvas
    canvas = np.zeros((size * ss, size * ss, 4), dtype=np.uint8)
    _draw_face(identity, c).render(canvas, nz)
    small = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    x, y = _grid(size)
    lit = (x - 0.5) * math.cos(nz.light_azimuth) + (y - 0.5) * math.sin(nz.light_azimuth)
    shade = nz.brightness * (1 + 2 * nz.light_strength * lit)
    t = np.clip(0.5 + (x - 0.5) * math.cos(nz.bg_angle) + (y - 0.5) * math.sin(nz.bg_angle), 0, 1)[..., None]
    bg = np.asarray(nz.bg_start, np.float32) * (1 - t) + np.asarray(nz.bg_end, np.float32) * t
    out = small[..., :3] * shade[..., None] + bg * (1 - small[..., 3:])
    return Image.fromarray(np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8), "RGB")


def _regions(idn: Identity) -> dict[str, list[np.ndarray]]:
    """Face-space envelopes of everything each component can move (extremes plus a small margin)."""
    es, ew, w, m = idn.eye_spacing, idn.eye_size, idn.face_width, 0.01
    eh, brow_v, half = ew * idn.eye_aspect, EYE_Y - idn.brow_height, idn.brow_thickness / 2
    brow_top, brow_bot = brow_v - 0.012 - BROW_LIFT - half - m, brow_v + BROW_LOWER + FURROW_DROP + half + m
    inner, outer = es - 0.9 * ew - FURROW_IN - m, es + BROW_PATCH * ew + m
    out: dict[str, list[np.ndarray]] = {"brows": [_box(-outer, brow_top, outer, brow_bot)]}
    for sgn, side in ((1, "left"), (-1, "right")):
        out[f"{side}_eye"] = [_box(sgn * es - ew - m, EYE_Y - eh - m, sgn * es + ew + m, EYE_Y + 0.7 * eh + m)]
        out[f"{side}_brow"] = [_box(sgn * inner, brow_top, sgn * outer, brow_bot)]
        cheek = _box(sgn * 0.4 * w, PUFF_V - 0.2, sgn * (w * (1 + PUFF) + m), PUFF_V + 0.2)
        out.setdefault("cheeks", []).append(cheek)
    nh = idn.nose_width * (1 + NOSTRIL_FLARE) * 0.72 + 0.016 + m
    out["nose"] = [_box(-nh, EYE_Y + 0.015, nh, idn.nose_length + m)]
    tu = idn.lip_thickness * 1.6
    mh = idn.mouth_width * (1 + STRETCH_WIDEN) + CORNER_OUT + CORNER_PATCH[0] + CORNER_PATCH[1] + m
    patch_v = CORNER_PATCH[2] + 0.01  # a corner's shading patch reaches this far beyond the moved corner
    out["mouth"] = [_box(-mh, MOUTH_Y - CORNER_LIFT - max(0.045, tu, patch_v) - m, mh,
                         MOUTH_Y + CORNER_LIFT + max(1.3 * tu, patch_v) + m)]
    jh = w + JAW_SHIFT + 0.06
    out["jaw"] = [_box(-jh, JAW_TOP - 0.005, jh, idn.face_height + JAW_DROP + JAW_TILT * w * (1 + PUFF) + m)]
    return out


def region_masks(identity: Identity, size: int, nuisance: Nuisance | None = None) -> dict[str, np.ndarray]:
    """Boolean (size, size) masks of the pixels each ``ComponentInfo.region`` may change, under that pose."""
    nz = nuisance or Nuisance.none()
    masks = {}
    for name, polys in _regions(identity).items():
        mask = np.zeros((size, size), dtype=np.uint8)
        cv2.fillPoly(mask, [np.rint(_warp(p, nz) * size * 16).astype(np.int32) for p in polys], 1, cv2.LINE_8, 4)
        masks[name] = mask.astype(bool)
    return masks
