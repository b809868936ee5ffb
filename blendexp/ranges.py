"""The ranges of the numbers every generation path takes (seeds, step counts, sizes, scales), checked before any
model loads or any work starts: a NaN scale or an overflowing seed is one clear error naming the option instead of
black images or an overflow deep inside torch."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# (lowest, highest, whole number) of every number ``ExpressionPipeline.__call__`` takes.
SAMPLING_RANGES: dict[str, tuple[float, float, bool]] = {
    "num_images": (1, 1024, True), "seed": (0, 2**63 - 1, True), "steps": (1, 1000, True),
    "guidance": (0.0, 100.0, False), "size": (8, 4096, True), "expression_scale": (0.0, 10.0, False),
    "reference_scale": (0.0, 10.0, False), "batch_size": (1, 1024, True)}


def _in_range(option: str, value: Any, low: float, high: float, integer: bool) -> int | float:
    """``value`` as int/float if it is a finite number in [low, high] (whole for counts), else an error naming it."""
    kind = "a whole number" if integer else "a finite number"
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option}={value!r} is not a number; give {kind} in [{low:g}, {high:g}]") from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high or (
            integer and number != int(number)):
        raise ValueError(f"{option}={value!r} is out of range; give {kind} in [{low:g}, {high:g}]")
    return int(number) if integer else float(number)


def check_sampling(names: Mapping[str, str] | None = None, **settings: Any) -> dict[str, Any]:
    """The sampling settings checked against ``SAMPLING_RANGES`` and converted (``size`` may be None: native);
    ``names`` maps a setting to what the user called it (``num_images`` is ``samples`` on the command line)."""
    names = names or {}
    return {key: value if key not in SAMPLING_RANGES or (key == "size" and value is None)
            else _in_range(names.get(key, key), value, *SAMPLING_RANGES[key]) for key, value in settings.items()}
