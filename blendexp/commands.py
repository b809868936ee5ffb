"""What the generation commands (``generate``, ``controllability``, ``demo``) share: input checks that run before any
model loads, the pipeline and identity built from the config, the sampling settings, and user errors as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from blendexp.flame import EXP_DIM, ID_DIM, NamedExpression, apply_edits, check_vector, parse_expression
from blendexp.images import IMAGE_EXTS, load_image
from blendexp.ranges import check_sampling

if TYPE_CHECKING:  # loaded in load_session only, so every input check answers before torch and diffusers import
    from blendexp.pipeline import ExpressionPipeline, FaceIdentity


def container(node: Any) -> Any:
    """Plain Python values of a config node (lists and dicts resolved), anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _placeholder(path: Path) -> np.ndarray:
    """Stands in for a driving image's SMIRK vector while inputs are checked; the image must decode."""
    load_image(path, "driving image")
    return np.zeros(EXP_DIM, dtype=np.float32)


def check_expressions(spec: Any, edits: Any) -> list[NamedExpression]:
    """Presets, FLAME files and edits resolved without SMIRK (driving images count as neutral here)."""
    return [(name, apply_edits(exp, container(edits))) for name, exp in parse_expression(container(spec), _placeholder)]


def check_identity(cfg: DictConfig) -> None:
    """A missing identity file, a wrong-length embedding or a reference without a photo fails before models load."""
    identity = Path(str(cfg.identity)).expanduser()
    if identity.suffix == ".npy" and identity.is_file():
        check_vector(np.load(identity, allow_pickle=False), ID_DIM, "identity embedding", str(identity))
    elif not identity.exists() and not any(c in str(cfg.identity) for c in "{*"):
        raise FileNotFoundError(f"identity not found: {identity} (give a face photo, an embedding .npy or shards)")
    elif identity.suffix.lower() in IMAGE_EXTS:
        load_image(identity, "identity image")
    if cfg.reference_image is not None:
        load_image(Path(str(cfg.reference_image)).expanduser(), "reference_image")
    if cfg.reference and cfg.reference_image is None and identity.suffix == ".npy":
        raise ValueError("reference=true needs a face photo: give identity=<photo> or reference_image=<photo>")
    if cfg.reference_image is not None and not cfg.reference:
        raise ValueError("reference_image is set but the Reference Adapter is off; add reference=true")


def load_session(cfg: DictConfig) -> tuple[ExpressionPipeline, FaceIdentity, np.ndarray | None]:
    """The configured pipeline, the identity and, with the Reference Adapter on, the aligned reference face."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    pipe: ExpressionPipeline = instantiate(cfg.pipeline)
    # A reference photo goes the official reference path (aligned at 512 px, identity re-extracted from it).
    own_reference = cfg.reference and cfg.reference_image is None
    photo = Path(str(cfg.identity)).suffix.lower() in IMAGE_EXTS
    face = pipe.reference_from_image(str(cfg.identity)) if own_reference and photo else pipe.load_identity(
        str(cfg.identity))
    if not cfg.reference:
        return pipe, face, None
    return pipe, face, face.image if own_reference else pipe.reference_from_image(str(cfg.reference_image)).image


def sampling(cfg: DictConfig) -> dict[str, Any]:
    """The ``ExpressionPipeline.__call__`` settings every command takes from the config, checked (errors name the
    config key), so a bad value fails before any model loads."""
    settings = check_sampling(seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance, size=cfg.size,
                              expression_scale=cfg.expression_scale, reference_scale=cfg.reference_scale,
                              batch_size=cfg.batch_size)
    return {**settings, "negative_expression": cfg.negative_expression}


def check_inputs(cfg: DictConfig) -> None:
    """Everything the generation commands share that can be checked before any model loads."""
    check_identity(cfg)
    sampling(cfg)
    check_sampling({"num_images": "samples"}, num_images=cfg.samples)
