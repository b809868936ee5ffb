"""The 55-d FLAME vector in one place: its layout (50 expression, 2 eyelid, 3 jaw, as SMIRK outputs it), the
components the embedded default draws, named presets, per-component edits, keyframe interpolation, FLAME files, and
parsing what a user typed (a preset name, a FLAME ``.npy``/``.json`` file, a driving image) — without loading a model.

Presets live in ``blendexp/presets.yaml`` (one file; its header says how the values relate to the toy world and to
real SMIRK/FLAME). Components are named ``exp.3``, ``eyelid.1``, ``jaw.0``. The lowest layer: the shard contract
(``data/format.py``), the models, the annotators and the toy world all take the layout from here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import yaml

from blendexp.images import IMAGE_EXTS

ID_DIM = 512  # the ArcFace identity embedding every FLAME vector is paired with
EXP_DIM = 55
N_EXPRESSION, N_EYELID, N_JAW = 50, 2, 3
EXPRESSION = slice(0, N_EXPRESSION)
EYELIDS = slice(N_EXPRESSION, N_EXPRESSION + N_EYELID)
JAW = slice(N_EXPRESSION + N_EYELID, EXP_DIM)
GROUPS: dict[str, slice] = {"exp": EXPRESSION, "eyelid": EYELIDS, "jaw": JAW}
COMPONENT_NAMES: tuple[str, ...] = tuple(
    [f"exp.{i}" for i in range(N_EXPRESSION)]
    + [f"eyelid.{i}" for i in range(N_EYELID)]
    + [f"jaw.{i}" for i in range(N_JAW)]
)
FLAME_EXTS = (".npy", ".json")
PRESETS_FILE = Path(__file__).with_name("presets.yaml")
EASINGS = ("linear", "smooth")
# Sweep range of components the toy world does not draw (FLAME expression coefficients are roughly unit-variance).
UNMAPPED_RANGE = (-3.0, 3.0)


def component_index(name: str) -> int:
    """Index of a FLAME component given as ``exp.3``, ``eyelid.1`` or ``jaw.0`` (used by CLI edits)."""
    if name not in COMPONENT_NAMES:
        raise KeyError(f"unknown FLAME component {name!r}; expected exp.0..exp.49, eyelid.0..1 or jaw.0..2")
    return COMPONENT_NAMES.index(name)


def check_vector(vec: Any, dim: int, what: str, origin: str = "") -> np.ndarray:
    """Return ``vec`` as float32 of shape (dim,), or raise naming where it came from and the expected size."""
    arr = np.asarray(vec, dtype=np.float32).reshape(-1)
    if arr.shape != (dim,):
        where = f" in {origin}" if origin else ""
        raise ValueError(f"{what}{where} has {arr.size} values; {dim} values are expected")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what}{origin and ' in ' + origin} contains NaN or Inf")
    return arr


@dataclass(frozen=True)
class ComponentInfo:
    """What one mapped FLAME index does in the toy world, so tests and metrics can target it."""

    name: str
    low: float
    high: float
    region: str  # key of the toy renderer's region_masks() that contains every pixel this component changes
    meaning: str


_C = ComponentInfo
# The components the embedded default (the toy world, blendexp/toyworld/params.py) draws, with SMIRK's ranges: the
# demo's sliders and the controllability sweeps. The meanings are the toy world's own, not FLAME's PCA semantics.
MAPPED_COMPONENTS: dict[int, ComponentInfo] = {
    component_index("exp.0"): _C("smile_left", -3.0, 3.0, "mouth", "+ lifts, - drops the subject's left mouth corner"),
    component_index("exp.1"): _C("smile_right", -3.0, 3.0, "mouth",
                                 "+ lifts, - drops the subject's right mouth corner"),
    component_index("exp.2"): _C("brow_left", -3.0, 3.0, "left_brow", "+ raises, - lowers the subject's left brow"),
    component_index("exp.3"): _C("brow_right", -3.0, 3.0, "right_brow", "+ raises, - lowers the subject's right brow"),
    component_index("exp.4"): _C("brow_furrow", 0.0, 3.0, "brows", "pulls the inner brows down and together"),
    component_index("exp.5"): _C("lip_pucker", -3.0, 3.0, "mouth",
                                 "+ narrow full lips (pucker), - wide thin lips (stretch)"),
    component_index("exp.6"): _C("nose_wrinkle", 0.0, 3.0, "nose", "flares and lifts the nostrils, creases the bridge"),
    component_index("exp.7"): _C("cheek_puff", 0.0, 3.0, "cheeks", "widens and brightens the cheeks"),
    EYELIDS.start: _C("eyelid_left", 0.0, 1.0, "left_eye", "closes the subject's left eye (1 = shut)"),
    EYELIDS.start + 1: _C("eyelid_right", 0.0, 1.0, "right_eye", "closes the subject's right eye (1 = shut)"),
    JAW.start: _C("jaw_open", 0.0, 0.4, "jaw", "opens the mouth and drops the chin"),
    JAW.start + 1: _C("jaw_sideways", -0.2, 0.2, "jaw", "+ moves the lower lip and chin to the image right"),
    JAW.start + 2: _C("jaw_roll", -0.2, 0.2, "jaw", "+ tilts the lower jaw down on the image right"),
}

NamedExpression = tuple[str, np.ndarray]  # (file-system-safe name, (55,) float32)


def sparse_vector(values: Mapping[str, Any], origin: str) -> np.ndarray:
    """A (55,) vector from ``{component: value}`` (others 0), naming ``origin`` when a component is unknown."""
    out = np.zeros(EXP_DIM, dtype=np.float32)
    for name, value in flatten_components(values).items():
        try:
            out[component_index(name)] = float(value)
        except KeyError as err:
            raise ValueError(f"{origin}: {err.args[0]}") from None
    return out


def flatten_components(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"jaw": {"0": 0.3}}`` → ``{"jaw.0": 0.3}``, so ``+edits.jaw.0=0.3`` and ``edits={jaw.0: 0.3}`` mean the same."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_components(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, np.ndarray]:
    """Parse and validate a presets file once per process."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    presets = data.get("presets")
    if not isinstance(presets, Mapping):
        raise ValueError(f"{path} has no 'presets:' mapping of name -> {{component: value}}")
    return {str(name): sparse_vector(values or {}, f"{path}: preset {name!r}") for name, values in presets.items()}


def load_presets(path: str | Path = PRESETS_FILE) -> dict[str, np.ndarray]:
    """Every preset of a presets file as (55,) vectors (copies, so callers may edit them)."""
    return {name: vec.copy() for name, vec in _load(str(path)).items()}


def preset(name: str, path: str | Path = PRESETS_FILE) -> np.ndarray:
    """One named expression; an unknown name fails listing every preset."""
    presets = _load(str(path))
    if name not in presets:
        raise ValueError(f"unknown expression preset {name!r}; presets: {', '.join(presets)} "
                         f"(or give a driving image or a FLAME .npy/.json file)")
    return presets[name].copy()


def apply_edits(exp: np.ndarray, edits: Mapping[str, Any] | None) -> np.ndarray:
    """Set single components on top of an expression, e.g. ``{"jaw.0": 0.3}`` opens the mouth further."""
    out = check_vector(exp, EXP_DIM, "FLAME vector").copy()
    for name, value in flatten_components(edits or {}).items():
        try:
            out[component_index(name)] = float(value)
        except KeyError as err:
            raise ValueError(f"edits: {err.args[0]}") from None
    return out


def component_range(name: str) -> tuple[float, float]:
    """Where a component lives: the toy world's range for the components it draws (SMIRK's), else ±3."""
    index = component_index(name)
    info = MAPPED_COMPONENTS.get(index)
    return (info.low, info.high) if info else UNMAPPED_RANGE


def component_label(name: str) -> str:
    """``exp.0 (toy: smile_left)``: the FLAME index and, where the toy world draws it, what it does there."""
    info = MAPPED_COMPONENTS.get(component_index(name))
    return f"{name} (toy: {info.name})" if info else name


def main_components() -> list[str]:
    """The components the embedded default can show (the demo's sliders), in FLAME order."""
    return [COMPONENT_NAMES[i] for i in sorted(MAPPED_COMPONENTS)]


def interpolate(keyframes: np.ndarray | Sequence[np.ndarray], frames: int, ease: str = "linear") -> np.ndarray:
    """(frames, 55) expressions passing through every keyframe (K, 55), first and last included.

    ``smooth`` eases in and out of each keyframe (smoothstep), so a transition pauses on each key expression.
    """
    keys = np.stack([check_vector(k, EXP_DIM, f"keyframe {i}") for i, k in enumerate(keyframes)])
    if len(keys) < 2 or frames < len(keys):
        raise ValueError(f"a transition needs at least 2 keyframes and as many frames; got {len(keys)} keyframes, "
                         f"{frames} frames")
    if ease not in EASINGS:
        raise ValueError(f"unknown easing {ease!r}; choose one of {EASINGS}")
    pos = np.linspace(0.0, len(keys) - 1, frames)
    seg = np.minimum(pos.astype(int), len(keys) - 2)
    u = (pos - seg)[:, None]
    if ease == "smooth":
        u = u * u * (3.0 - 2.0 * u)
    return ((1.0 - u) * keys[seg] + u * keys[seg + 1]).astype(np.float32)


def safe_name(text: str) -> str:
    """A name usable as one path component on every file system (cached generations are stored under it)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    if not name:
        raise ValueError(f"cannot make a file name from {text!r}")
    return name


def _flame_rows(data: Any, path: Path) -> list[tuple[str, Any]]:
    """(suffix, vector) pairs of a FLAME file's content; a single vector gets no suffix."""
    if isinstance(data, dict):
        data = data.get("exp", data)
    if isinstance(data, dict):
        return [(str(k), v) for k, v in data.items()]
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(f"FLAME file {path} does not hold numbers of shape ({EXP_DIM},) or (K, {EXP_DIM}): {err}") from err
    if arr.ndim == 1:
        return [("", arr)]
    if arr.ndim == 2:
        return [(str(i), row) for i, row in enumerate(arr)]
    raise ValueError(f"FLAME file {path} holds an array of shape {arr.shape}; expected ({EXP_DIM},) or (K, {EXP_DIM})")


def read_flame_file(path: str | Path) -> list[NamedExpression]:
    """Named vectors of one ``.npy`` / ``.json`` FLAME file: ``(55,)``, ``(K, 55)``, a list of such lists or
    ``{name: [55 numbers]}``; a vector of the wrong length fails naming the file."""
    path = Path(path)
    try:
        data: Any = np.load(path, allow_pickle=False) if path.suffix == ".npy" else json.loads(path.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"cannot read FLAME file {path}: {err}") from err
    return [(safe_name(f"{path.stem}-{suffix}" if suffix else path.stem),
             check_vector(vec, EXP_DIM, "FLAME vector", f"{path}{f' [{suffix}]' if suffix else ''}"))
            for suffix, vec in _flame_rows(data, path)]


def parse_expression(spec: Any, from_image: Callable[[Path], np.ndarray] | None = None) -> list[NamedExpression]:
    """What a user gave as an expression → named (55,) vectors.

    ``spec``: a preset name; a FLAME ``.npy``/``.json`` file (one vector, or several: one entry each); a driving image
    (read with ``from_image``, i.e. SMIRK); 55 numbers; or a list of any of these.
    """
    if isinstance(spec, np.ndarray) or (isinstance(spec, Sequence) and not isinstance(spec, str) and spec
                                        and all(isinstance(v, (int, float)) for v in spec)):
        return [("custom", check_vector(spec, EXP_DIM, "FLAME vector"))]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [named for item in spec for named in parse_expression(item, from_image)]
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix.lower() in FLAME_EXTS:
        if not path.is_file():
            raise FileNotFoundError(f"FLAME file not found: {path}")
        return read_flame_file(path)
    if path.suffix.lower() in IMAGE_EXTS:
        if not path.is_file():
            raise FileNotFoundError(f"driving image not found: {path}")
        if from_image is None:
            raise ValueError(f"{path} is a driving image; reading its expression needs SMIRK (use ExpressionPipeline)")
        return [(safe_name(path.stem), from_image(path))]
    if any(sep in text for sep in "/\\") or path.exists():
        raise ValueError(f"{text}: not a FLAME file ({', '.join(FLAME_EXTS)}) or an image ({', '.join(IMAGE_EXTS)})")
    return [(safe_name(text), preset(text))]


def negative_expression(spec: Any, from_image: Callable[[Path], np.ndarray] | None = None) -> np.ndarray | None:
    """The one (55,) FLAME vector classifier-free guidance pushes away from; None (zeros) is the trained default.

    A near-neutral target differs little from zeros, so guidance barely moves it; the mean training expression
    (a FLAME file) as the negative pushes every target away from the average face instead."""
    if spec is None:
        return None
    found = parse_expression(spec, from_image)
    if len(found) != 1:
        raise ValueError(f"negative_expression={spec!r} gives {len(found)} FLAME vectors; give exactly one (a preset, a "
                         f"FLAME file holding one vector, a driving image or 55 numbers)")
    return found[0][1]


def describe(exp: np.ndarray, tol: float = 1e-6) -> dict[str, float]:
    """The non-zero components of a vector by name (what settings.json records, readable and re-usable as edits)."""
    return {COMPONENT_NAMES[i]: round(float(v), 6) for i, v in enumerate(exp) if abs(v) > tol}

