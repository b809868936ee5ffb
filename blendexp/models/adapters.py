"""Where adapters come from and how they are attached, in one place for the pipeline and the evaluation methods.

An Expression Adapter is a training run folder (its ``export/``), an export folder, an ``exp_adapter`` file, a
Lightning ``.ckpt`` (exported on the fly), or nothing (a fresh, seeded, untrained adapter: the embedded default's
plumbing check); a Reference Adapter is a ``ref`` LoRA file, its folder or a run folder, or an untrained LoRA. Both
are attached by diffusers' own loaders (``load_ip_adapter``, ``load_lora_weights``) onto a plain pipeline."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel

from blendexp.checkpoints import adapter_folder, load_weights_only
from blendexp.flame import EXP_DIM
from blendexp.models.arc2face import Arc2FaceBase
from blendexp.models.expression_adapter import (
    EXPORT_DIR,
    WEIGHT_NAME,
    adapter_file,
    attach_expression_adapter,
    fold_input_scale,
    has_adapter,
    save_expression_adapter,
)
from blendexp.models.reference_adapter import (
    ADAPTER_NAME,
    LORA_WEIGHT_NAME,
    add_reference_lora,
    add_reference_reader,
    has_lora,
    lora_file,
    reference_unet,
    save_reference_lora,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _checkpoint_state(path: Path, unet: UNet2DConditionModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The UNet weights of a blendexp Lightning checkpoint and the adapter shape they imply (read off the shapes;
    the recorded ``adapter.projection`` tells the "Full" form from a 1-token, width-1 mlp, which has its shapes)."""
    ckpt = load_weights_only(path)
    hp = ckpt.get("hyper_parameters", {}).get("adapter") or {}
    state = {k.removeprefix("unet."): v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("unet.")}
    state = fold_input_scale(state, hp.get("input_scale"))
    proj, cross = "encoder_hid_proj.image_projection_layers.0.", unet.config.cross_attention_dim
    if proj + "image_embeds.weight" in state:
        return state, {"projection": "linear", "num_tokens": state[proj + "image_embeds.weight"].shape[0] // cross}
    if proj + "ff.net.0.proj.weight" in state and hp.get("projection") == "full":
        return state, {"projection": "full", "num_tokens": 1}
    if proj + "ff.net.0.proj.weight" in state:
        return state, {"projection": "mlp", "num_tokens": state[proj + "ff.net.2.weight"].shape[0] // cross,
                       "mult": state[proj + "ff.net.0.proj.weight"].shape[0] // EXP_DIM}
    raise ValueError(f"{path} holds no Expression Adapter weights; give an expr_adapter run folder, its export/ "
                     f"folder, an exp_adapter file or that run's checkpoint")


def export_checkpoint_adapter(path: Path, unet: UNet2DConditionModel, folder: Path) -> Path:
    """Write the adapter of a Lightning checkpoint as ``exp_adapter.*`` so it loads through the official loader."""
    scratch = copy.deepcopy(unet)
    state, shape = _checkpoint_state(path, scratch)
    attach_expression_adapter(scratch, **shape)
    missing, unexpected = scratch.load_state_dict(state, strict=False)
    absent = [k for k in missing if k.startswith("encoder_hid_proj") or "_ip." in k]
    if absent or unexpected:
        raise ValueError(f"{path} does not match this base's Expression Adapter: missing {absent[:3]}, "
                         f"unexpected {unexpected[:3]}; was it trained on another base?")
    save_expression_adapter(scratch, folder)
    return folder


def resolve_adapter(path: str | None, unet: UNet2DConditionModel, workdir: Path, seed: int) -> Path:
    """An Expression Adapter file or folder that ``load_ip_adapter`` reads, from any accepted form: a run folder,
    its ``export/``, a ``models/`` or ``exp_adapter/`` folder, an adapter file, a ``.ckpt``, or None (a fresh,
    untrained one)."""
    if path is None:
        log.warning("no expression adapter configured: using a freshly initialised (untrained) one — a plumbing "
                    "check, not a result")
        scratch = copy.deepcopy(unet)
        torch.manual_seed(seed)
        attach_expression_adapter(scratch)
        save_expression_adapter(scratch, workdir / "_weights" / "untrained_exp_adapter")
        return workdir / "_weights" / "untrained_exp_adapter"
    p = Path(path)
    if p.is_file() and p.suffix == ".ckpt":
        return export_checkpoint_adapter(p, unet, workdir / "_weights" / f"ckpt_{p.stem}")
    if p.is_file():
        return p
    return adapter_folder(p, EXPORT_DIR, has_adapter, "expression adapter",
                          f"a training run folder, its export/ folder, a models/ folder, an {EXPORT_DIR}/ folder or "
                          f"{WEIGHT_NAME}.safetensors/.bin file (e.g. <models>/{EXPORT_DIR}) or a .ckpt")


def untrained_reference_lora(unet: UNet2DConditionModel, workdir: Path, seed: int, rank: int = 16) -> Path:
    """A fresh ``ref`` LoRA (seeded) in diffusers' file format, when none is given: a plumbing check, not a result."""
    scratch = copy.deepcopy(unet)
    torch.manual_seed(seed)
    add_reference_lora(scratch, rank=rank)
    return save_reference_lora(scratch, workdir / "_weights" / "untrained_ref_adapter")


def find_reference_lora(spec: str | Path | None, fallbacks: list[Path], unet: UNet2DConditionModel, workdir: Path,
                        seed: int, rank: int = 16) -> tuple[Path, str]:
    """(``ref`` LoRA path, label): the given file, folder or run folder, else the first fallback folder holding one
    (``<models>/ref_adapter``), else a fresh untrained LoRA (seeded)."""
    if spec is not None:
        path = lora_file(spec)
        return path, str(path)
    found = next((folder / LORA_WEIGHT_NAME for folder in fallbacks if has_lora(folder)), None)
    if found is not None:
        return found, str(found)
    log.warning("no Reference Adapter given%s: using an untrained LoRA — a plumbing check, not a result",
                "".join(f" or in {folder}" for folder in fallbacks))
    return untrained_reference_lora(unet, workdir, seed, rank), f"untrained (seed {seed})"


def check_pickled_adapter(spec: str | Path | bool | None) -> None:
    """Refuse an adapter file that needs arbitrary unpickling before any base loads (the file is read twice)."""
    if isinstance(spec, (str, Path)) and Path(spec).suffix in (".bin", ".ckpt", ".pt", ".pth") and Path(spec).is_file():
        load_weights_only(spec)


def find_expression_adapter(spec: str | Path | None, ref: Path | None, fallbacks: list[Path],
                            unet: UNet2DConditionModel, workdir: Path, seed: int) -> tuple[Path, str]:
    """(adapter path, label): the given one, else the one trained with the ``ref`` LoRA (beside it: the same folder
    or its sibling ``exp_adapter/``), else the first fallback folder holding one (``<models>/exp_adapter``), else a
    fresh untrained adapter (seeded)."""
    if spec is not None:
        return resolve_adapter(str(spec), unet, workdir, seed), str(spec)
    beside = [] if ref is None else [ref if ref.is_dir() else ref.parent]
    for folder in beside + [b.parent / EXPORT_DIR for b in beside] + fallbacks:
        try:
            path = resolve_adapter(str(folder), unet, workdir, seed)
        except FileNotFoundError:
            continue
        return path, str(path)
    return resolve_adapter(None, unet, workdir, seed), f"untrained (seed {seed})"


def load_ip_adapter(pipe: StableDiffusionPipeline, path: Path) -> None:
    """Attach an Expression Adapter file (or a folder holding ``exp_adapter.*``) with diffusers' own loader."""
    if path.is_dir():
        path = adapter_file(path)
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)


def adapter_pipeline(base: Arc2FaceBase, scheduler: SchedulerMixin, expression_adapter: Path | None,
                     reference_adapter: Path | None = None
                     ) -> tuple[StableDiffusionPipeline, UNet2DConditionModel | None]:
    """A plain diffusers pipeline on ``base`` with the adapters attached by diffusers' loaders (``load_ip_adapter``,
    ``load_lora_weights``), and the reference UNet (a copy of the plain base) when a ``ref`` LoRA is given."""
    ref_unet = reference_unet(base.unet) if reference_adapter is not None else None  # before any adapter
    pipe = base.pipeline(scheduler)
    if expression_adapter is not None:
        load_ip_adapter(pipe, expression_adapter)
    if reference_adapter is not None:
        pipe.load_lora_weights(str(reference_adapter), adapter_name=ADAPTER_NAME)
        add_reference_reader(pipe.unet)  # after load_ip_adapter, which resets every processor
    return pipe, ref_unet
