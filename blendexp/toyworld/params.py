"""The toy world's parameter spaces: who is in the picture, which expression, which photo conditions.

Kept apart from the drawing code (render.py, which re-exports everything here) so that data
builders and metrics can sample and save ground truth without touching geometry.

Mapped FLAME indices (every other coefficient is ignored by the renderer and sampled as 0; the
meanings are this toy world's own, not FLAME's PCA semantics). "left" is the SUBJECT's left,
which appears on the IMAGE right, as in FLAME/SMIRK naming:

====  ============  ============  ==========  ==================================================
idx   component     name          range       visible change (region)
====  ============  ============  ==========  ==================================================
0     exp.0         smile_left    [-3, 3]     + lifts / - drops the left mouth corner (mouth)
1     exp.1         smile_right   [-3, 3]     same for the right corner (mouth)
2     exp.2         brow_left     [-3, 3]     + raises / - lowers the left brow (left_brow)
3     exp.3         brow_right    [-3, 3]     same for the right brow (right_brow)
4     exp.4         brow_furrow   [0, 3]      inner brows down and together, glabella lines (brows)
5     exp.5         lip_pucker    [-3, 3]     + narrow full lips / - wide thin lips (mouth)
6     exp.6         nose_wrinkle  [0, 3]      nostrils flare and lift, bridge creases (nose)
7     exp.7         cheek_puff    [0, 3]      cheeks widen and brighten (cheeks)
50    eyelid.0      eyelid_left   [0, 1]      left upper lid closes, 1 = shut (left_eye)
51    eyelid.1      eyelid_right  [0, 1]      same for the right eye (right_eye)
52    jaw.0         jaw_open      [0, 0.4]    mouth opens, teeth show, chin drops (jaw)
53    jaw.1         jaw_sideways  [-0.2, 0.2] + lower lip and chin move to the image right (jaw)
54    jaw.2         jaw_roll      [-0.2, 0.2] + lower jaw tilts down on the image right (jaw)
====  ============  ============  ==========  ==================================================

Values outside a range are clipped when drawing. Ranges follow SMIRK's outputs. The table as data is
``MAPPED_COMPONENTS`` in ``blendexp/flame.py`` (the demo's sliders and the presets use it too).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass, fields

import numpy as np

from blendexp.flame import EXP_DIM, MAPPED_COMPONENTS, check_vector

RGB = tuple[float, float, float]
RGB_FIELDS = ("skin", "hair", "eye", "lip", "glasses_rgb", "shirt")
INT_FIELDS = ("hair_style", "glasses")
HAIR_STYLES = ("short", "long", "bald", "fringe", "curly")


@dataclass(frozen=True)
class Identity:
    """Everything that makes one toy person recognisable; lengths are frame fractions, colours RGB in [0, 1]."""

    face_width: float  # half-width at the cheeks
    face_height: float  # v of the chin
    jaw_roundness: float  # superellipse exponent of the lower face: low = pointed chin, high = square
    skin: RGB
    hair: RGB
    hair_style: int  # index into HAIR_STYLES
    eye: RGB  # iris colour
    eye_spacing: float  # half the distance between the eye centres
    eye_size: float  # half-width of an eye
    eye_aspect: float  # half-height / half-width of an eye
    nose_length: float  # v of the nose bottom
    nose_width: float
    mouth_width: float  # half-width of the mouth
    lip_thickness: float
    lip: RGB
    brow_thickness: float
    brow_height: float  # brow above the eye centre
    glasses: int  # 0 none, 1 round, 2 square
    glasses_rgb: RGB
    shirt: RGB
    ear_size: float

    def to_vector(self) -> np.ndarray:
        """Flat float32 vector (IDENTITY_DIM,) stored next to rendered data as the identity label."""
        flat = [x for v in astuple(self) for x in (v if isinstance(v, tuple) else (v,))]
        return np.asarray(flat, dtype=np.float32)

    @classmethod
    def from_vector(cls, vec: np.ndarray) -> Identity:
        """Inverse of ``to_vector``, so saved ground truth re-renders the same face."""
        vec = check_vector(vec, IDENTITY_DIM, "identity vector")
        values, i = {}, 0
        for f in fields(cls):
            n = 3 if f.name in RGB_FIELDS else 1
            chunk = [float(x) for x in vec[i : i + n]]
            scalar = int(round(chunk[0])) if f.name in INT_FIELDS else chunk[0]
            values[f.name] = tuple(chunk) if n == 3 else scalar
            i += n
        return cls(**values)


IDENTITY_DIM = len(fields(Identity)) + 2 * len(RGB_FIELDS)


@dataclass
class Nuisance:
    """What changes a photo but not the person or expression: pose, light, background, framing."""

    yaw: float = 0.0  # radians; + turns the nose towards the image right
    pitch: float = 0.0
    roll: float = 0.0
    light_azimuth: float = 0.0  # direction (image plane) the light comes from
    light_strength: float = 0.0  # shading varies by about +-strength across the frame
    brightness: float = 1.0
    bg_start: RGB = (0.8, 0.8, 0.8)  # background gradient colours, RGB in [0, 1]
    bg_end: RGB = (0.8, 0.8, 0.8)
    bg_angle: float = 0.0  # direction of the background gradient
    scale: float = 1.0
    dx: float = 0.0  # shift in frame fractions
    dy: float = 0.0

    @classmethod
    def none(cls) -> Nuisance:
        """Frontal, flat-lit, centred face on a grey background (the aligned reference view)."""
        return cls()

    def to_vector(self) -> np.ndarray:
        """Flat float32 vector so per-frame nuisances can be saved and interpolated."""
        flat = [x for v in astuple(self) for x in (v if isinstance(v, tuple) else (v,))]
        return np.asarray(flat, dtype=np.float32)

    @classmethod
    def from_vector(cls, vec: np.ndarray) -> Nuisance:
        """Inverse of ``to_vector``."""
        v = [float(x) for x in np.asarray(vec, dtype=np.float64).reshape(-1)]
        return cls(*v[:6], tuple(v[6:9]), tuple(v[9:12]), *v[12:16])  # type: ignore[arg-type]


def _pick(rng: np.random.Generator, palette: list[RGB], jitter: float) -> RGB:
    """A palette colour with per-channel jitter, so identities share types but never exact colours."""
    c = np.asarray(palette[rng.integers(len(palette))], dtype=np.float64) + rng.uniform(-jitter, jitter, 3)
    return _rgb(c / 255.0)


def _rgb(c: np.ndarray) -> RGB:
    """Clipped [0, 1] colour tuple (the unit every colour field uses)."""
    return tuple(float(x) for x in np.clip(c, 0.0, 1.0))  # type: ignore[return-value]


SKIN = [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 96), (160, 100, 66), (114, 70, 46)]
HAIR = [(25, 22, 22), (62, 42, 28), (110, 72, 40), (155, 72, 35), (220, 185, 120), (175, 175, 175),
        (235, 233, 228), (45, 75, 170), (205, 85, 145), (55, 135, 85)]  # fmt: skip
IRIS = [(75, 45, 25), (40, 28, 20), (70, 120, 185), (75, 135, 85), (135, 105, 55), (120, 130, 145)]
FRAMES = [(20, 20, 20), (120, 70, 30), (180, 180, 190), (150, 30, 30), (30, 60, 140)]


# Who may be drawn where: every toy identity comes from one stream (a use) and a subject number. A stream holds a
# use's subjects in ranges (the base's training and validation stills and the clips share ``stills``, in disjoint
# ranges); different streams never share a person.
IDENTITY_STREAMS = {"stills": 0, "annotator_train": 1, "annotator_heldout": 2, "fresh": 3, "builder_inputs": 4}


def identity_rng(seed: int, stream: str, subject: int) -> np.random.Generator:
    """The generator that draws ``subject`` of ``stream`` (its identity, then what that subject's faces show).

    Keys have one length, (seed, subject, stream): numpy ignores trailing zeros of a seed list, so keys of different
    lengths collide (``[0, k, 0]`` is ``[0, k]``), while distinct keys of one length never do. ``stills`` (0) keeps
    the ``(seed, subject)`` key the shipped sample shards were drawn with."""
    if stream not in IDENTITY_STREAMS:
        raise ValueError(f"unknown identity stream {stream!r}; one of {sorted(IDENTITY_STREAMS)}")
    if not (0 <= seed < 2**32 and 0 <= subject < 2**32):
        raise ValueError(f"seed {seed} and subject {subject} must be in [0, 2**32): larger values take two key words")
    return np.random.default_rng([seed, subject, IDENTITY_STREAMS[stream]])


def sample_identity(rng: np.random.Generator) -> Identity:
    """A random, visually distinct person (categorical hair/glasses/colours plus continuous shape)."""
    u = rng.uniform
    skin = _pick(rng, SKIN, 10)
    lipstick = u() < 0.2
    natural = _rgb(np.asarray(skin) * (0.85, 0.6, 0.62) + u(-0.05, 0.05))
    lip = _pick(rng, [(185, 35, 55), (150, 45, 95), (205, 85, 85)], 15) if lipstick else natural
    ident = Identity(
        face_width=u(0.25, 0.30), face_height=u(0.84, 0.89), jaw_roundness=u(1.7, 3.2), skin=skin,
        hair=_pick(rng, HAIR, 15), hair_style=int(rng.integers(len(HAIR_STYLES))), eye=_pick(rng, IRIS, 15),
        eye_spacing=u(0.11, 0.13), eye_size=u(0.066, 0.078), eye_aspect=u(0.55, 0.70),
        nose_length=u(0.56, 0.61), nose_width=u(0.035, 0.052), mouth_width=u(0.07, 0.095),
        lip_thickness=u(0.013, 0.023), lip=lip, brow_thickness=u(0.013, 0.024), brow_height=u(0.075, 0.09),
        glasses=int(rng.choice(3, p=[0.6, 0.2, 0.2])), glasses_rgb=_pick(rng, FRAMES, 15),
        shirt=_rgb(u(0.08, 0.92, 3)), ear_size=u(0.04, 0.055),
    )
    return Identity.from_vector(ident.to_vector())  # float32-exact, so saved vectors re-render identically


def neutral_expression() -> np.ndarray:
    """All-zero FLAME vector: mouth closed, eyes open, brows at rest."""
    return np.zeros(EXP_DIM, dtype=np.float32)


def sample_expression(rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random (55,) expression: each mapped component is active with p=0.5, uniform over scale x range."""
    out = neutral_expression()
    idx = np.fromiter(MAPPED_COMPONENTS, dtype=int)
    lo = np.array([c.low for c in MAPPED_COMPONENTS.values()])
    hi = np.array([c.high for c in MAPPED_COMPONENTS.values()])
    active = rng.random(len(idx)) < 0.5
    out[idx] = np.where(active, np.clip(rng.uniform(lo, hi) * scale, lo, hi), 0.0)
    return out


def sample_nuisance(rng: np.random.Generator, strength: float = 1.0) -> Nuisance:
    """Random small pose, light, background and framing changes; strength 0 renders like ``Nuisance.none()``."""
    s, u = strength, rng.uniform
    grey = np.asarray(Nuisance.bg_start)
    bg = [_rgb(grey + (u(0.1, 0.92, 3) - grey) * min(s, 1.0)) for _ in range(2)]
    return Nuisance(yaw=u(-0.25, 0.25) * s, pitch=u(-0.15, 0.15) * s, roll=u(-0.12, 0.12) * s,
                    light_azimuth=u(-math.pi, math.pi), light_strength=u(0.0, 0.3) * s,
                    brightness=1.0 + u(-0.15, 0.15) * s, bg_start=bg[0], bg_end=bg[1],
                    bg_angle=u(0, 2 * math.pi), scale=1.0 + u(-0.06, 0.06) * s, dx=u(-0.03, 0.03) * s,
                    dy=u(-0.03, 0.03) * s)  # fmt: skip

