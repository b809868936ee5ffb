"""GPU memory of a real-size run, projected before it starts: the memory model benchmarks/real_size.py fits.

For each recipe, image size and gradient-checkpointing setting the benchmark counts the persistent memory (weights,
gradients, optimizer state) and measures the transient memory of a training step at batch 1 and 2: peak(B) =
max(fixed + B x per_sample, floor), in float32 and re-expressed for bf16 mixed precision.
``blendexp/memory_model.json`` is the shipped fit (the benchmark writes it); a run on a GPU with the real-size base
prints its projection and warns when the batch would not fit the GPU. A projection, not a measurement: the CUDA
context and allocator fragmentation come on top.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).with_name("memory_model.json")
GIB = 2**30


def setting_key(recipe: str, size: int, checkpointing: bool) -> str:
    """How the benchmark names a measured setting."""
    return f"{recipe}/{size}/checkpointing={checkpointing}"


def load_fits(path: str | Path | None, precision: str) -> dict[str, dict[str, Any]]:
    """Setting → {fixed_bytes, per_sample_bytes} at ``precision`` (bf16 or fp32) from a real_size results file
    (``None``: the shipped one)."""
    path = Path(path) if path else SHIPPED
    if not path.is_file():
        if path != SHIPPED:
            raise FileNotFoundError(f"memory_model={path}: no such file (benchmarks/real_size.py writes it)")
        return {}
    measured = json.loads(path.read_text())["measured"]
    return {k: v["model"][precision] for k, v in measured.items() if "model" in v}


def project(fit: dict[str, Any], batch: int, scale: float = 1.0) -> float:
    """Projected peak bytes at ``batch``: the forward/backward grows with it, the optimizer step does not;
    ``scale`` multiplies the per-sample bytes (activations scale with pixels)."""
    return max(fit["fixed_bytes"] + batch * fit["per_sample_bytes"] * scale, fit["floor_bytes"])


def largest_batch(fit: dict[str, Any], capacity: float, scale: float = 1.0) -> int | None:
    """The largest batch whose projection fits ``capacity`` bytes (None: the fit did not grow with the batch)."""
    if fit["floor_bytes"] > capacity or fit["fixed_bytes"] + fit["per_sample_bytes"] * scale > capacity:
        return 0
    if fit["per_sample_bytes"] <= 0:
        return None
    return int((capacity - fit["fixed_bytes"]) // (fit["per_sample_bytes"] * scale))


def nearest(fits: dict[str, dict[str, Any]], recipe: str, size: int,
            checkpointing: bool) -> tuple[dict[str, Any], float, str] | None:
    """The fit of the nearest measured size of this recipe and setting, the per-sample scale to ``size`` (pixels)
    and how it was derived (None when the recipe was not measured)."""
    sizes = [int(k.split("/")[1]) for k in fits if k.startswith(f"{recipe}/")
             and k.endswith(f"checkpointing={checkpointing}")]
    if not sizes:
        return None
    near = min(sizes, key=lambda s: abs(s - size))
    how = f"measured at {near} px" + ("" if near == size else f", activations scaled to {size} px")
    return fits[setting_key(recipe, near, checkpointing)], (size / near) ** 2, how


def report(recipe: str, size: int, checkpointing: bool, batch: int, precision: str, path: str | Path | None,
           capacity: float | None) -> str | None:
    """The projection line printed before a real-size GPU run (a warning when it exceeds ``capacity``)."""
    bf16 = precision.startswith("bf16")
    fits = load_fits(path, "bf16" if bf16 else "fp32")
    got = nearest(fits, recipe, size, checkpointing)
    if got is None:
        return None
    fit, scale, how = got
    need = project(fit, batch, scale)
    line = (f"memory model (benchmarks/real_size.py, a projection, {how}): {recipe} at {size} px, batch {batch}, "
            f"gradient checkpointing {checkpointing}: about {need / GIB:.1f} GiB of GPU memory in "
            f"{'bf16 mixed precision' if bf16 else 'float32'}, plus the CUDA context")
    if capacity is None:
        log.info(line)
        return line
    fits_in = largest_batch(fit, capacity, scale)
    line += f"; this GPU has {capacity / GIB:.1f} GiB, the largest batch that fits is about " + (
        str(fits_in) if fits_in is not None else "unbounded by the measured activations")
    if need > capacity:
        line += (f". data.batch_size={batch} will not fit: lower it, set model.gradient_checkpointing=true, or "
                 "accumulate gradients (trainer.accumulate_grad_batches)")
        log.warning(line)
    else:
        log.info(line)
    return line
