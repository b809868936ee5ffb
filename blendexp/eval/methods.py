"""The methods an evaluation compares, built from YAML by ``kind``: ``arc2face`` (no adapter, the baseline),
``expr_adapter`` (Expression Adapter), ``expr_ref`` (Expression + Reference Adapter, reference mode) and
``folder`` (pre-generated images of any other method).

A ``folder`` method holds one image per (source, target, sample) at ``<path>/<source>/<target>_<k>.<ext>``
(``png``/``jpg``/...; names as in the run's ``sources.csv`` / ``targets.csv``, ``k`` = 0 .. samples-1). Generating methods write the
same layout under ``<run>/generations/<method>``, so one run's generations can be scored as another's baseline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from blendexp.flame import negative_expression
from blendexp.images import IMAGE_EXTS
from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.adapters import (
    DTYPES,
    adapter_pipeline,
    find_expression_adapter,
    find_reference_lora,
)
from blendexp.models.sampling import sample
from blendexp.models.tiny import ensure_tiny_base
from blendexp.ranges import check_sampling


@dataclass
class GenerationSettings:
    """How images are generated; part of the cache manifest, so changing one never reuses stale images."""

    steps: int = 25
    guidance: float = 3.0
    size: int = 512
    dtype: str = "float32"


class FolderMethod:
    """Images generated elsewhere, read from ``<path>/<source>/<target>_<k>.<ext>``."""

    kind: ClassVar[str] = "folder"

    def __init__(self, name: str, path: str) -> None:
        self.name, self.root = name, Path(path)
        if not self.root.is_dir():
            raise FileNotFoundError(f"eval.methods.{name}.path: {self.root} is not a folder; external baselines are "
                                    f"folders of <source>/<target>_<k>.png images (names as in pairs.csv)")

    def image_path(self, source: str, target: str, k: int) -> Path | None:
        """The stored image for this (source, target, sample), or None when the folder lacks it."""
        stem = self.root / source / f"{target}_{k}"
        return next((stem.with_suffix(ext) for ext in IMAGE_EXTS if stem.with_suffix(ext).is_file()), None)


class Arc2FaceMethod:
    """Arc2Face alone: ID tokens, no expression control (the baseline every adapter must beat on expression)."""

    kind: ClassVar[str] = "arc2face"
    uses_reference: ClassVar[bool] = False  # reads the source photo as a reference image (reference mode)

    def __init__(self, name: str, base: Mapping[str, Any], gen: GenerationSettings, device: str = "cpu",
                 seed: int = 0, **options: Any) -> None:
        self.name, self.base_cfg, self.gen, self.device, self.seed = name, dict(base), gen, device, seed
        self.options = dict(options)
        self.negative = negative_expression(self.options.get("negative_expression"))  # fail before any generation
        self.pipe: StableDiffusionPipeline | None = None

    def settings(self) -> dict[str, Any]:
        """Everything that decides the images (written to the cache manifest)."""
        return {"kind": self.kind, "base": self.base_cfg, "seed": self.seed, "seeding": "pair_seed",
                **asdict(self.gen), **self.options}

    def load_base(self) -> Arc2FaceBase:
        """The base in the configured dtype; with ``tiny_root`` the tiny random base is written there first."""
        models, sd15, tiny = self.base_cfg["models"], self.base_cfg["sd15"], self.base_cfg.get("tiny_root")
        if tiny:
            models, sd15 = ensure_tiny_base(tiny)
        return Arc2FaceBase.from_pretrained(str(models), str(sd15), dtype=DTYPES[self.gen.dtype])

    def build(self, base: Arc2FaceBase, workdir: Path) -> None:
        """Attach this method's adapters to ``base`` and make the pipeline."""
        self.pipe = base.pipeline(DPMSolverMultistepScheduler.from_config(base.scheduler.config))

    def load(self, workdir: Path) -> None:
        """Load weights (only called when some image is not cached yet)."""
        self.build(self.load_base(), workdir)
        assert self.pipe is not None
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def conditions(self, exp: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
        """``sample``'s inputs beyond the identity for one row (Arc2Face alone: none; subclasses add theirs)."""
        return {}

    @torch.no_grad()
    def generate(self, id_emb: np.ndarray, exp: np.ndarray, sources: list[np.ndarray], seeds: list[int]
                 ) -> list[np.ndarray]:
        """One (size, size, 3) uint8 image per row of ``id_emb`` (B, 512) / ``exp`` (B, 55), one seed each."""
        assert self.pipe is not None, "call load() first"
        dtype, size = DTYPES[self.gen.dtype], self.gen.size
        pipe = self.pipe
        prompt = id_prompt_embeds(pipe.text_encoder, pipe.tokenizer, torch.from_numpy(id_emb).to(self.device))
        refs = [None] * len(seeds)
        if self.uses_reference:  # the source photos at the generation size, in [-1, 1]
            refs = [(torch.from_numpy(np.array(Image.fromarray(s).resize((size, size), Image.Resampling.BICUBIC)))
                     .permute(2, 0, 1)[None].float() / 127.5 - 1.0).to(self.device, dtype) for s in sources]
        exp_t = torch.from_numpy(exp).to(self.device, dtype)
        common = dict(steps=self.gen.steps, guidance=self.gen.guidance, size=size)
        # One call per row: diffusers shares precomputed IP embeds across a call.
        return [sample(pipe, prompt[i:i + 1].to(dtype), [seed], **common, **self.conditions(exp_t[i:i + 1], refs[i]))[0]
                for i, seed in enumerate(seeds)]

    def close(self) -> None:
        """Free the models before the next method loads its own."""
        self.pipe = None


class ExpressionAdapterMethod(Arc2FaceMethod):
    """Arc2Face + Expression Adapter (blendexp-trained or the official ``exp_adapter``)."""

    kind: ClassVar[str] = "expr_adapter"

    def build(self, base: Arc2FaceBase, workdir: Path) -> None:
        """The adapter attached by diffusers' loader, as ``ExpressionPipeline`` does (``adapter_pipeline``)."""
        path, _ = find_expression_adapter(self.options.get("adapter"), None, [], base.unet, workdir, self.seed)
        self.pipe, _ = adapter_pipeline(base, DPMSolverMultistepScheduler.from_config(base.scheduler.config), path)
        self.pipe.set_ip_adapter_scale(float(self.options.get("scale", 1.0)))

    def conditions(self, exp: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
        """The FLAME vector, with the configured negative (else zeros) for guidance."""
        return {"exp": exp, "negative": self.negative}


class ReferenceAdapterMethod(ExpressionAdapterMethod):
    """Expression + Reference Adapter in reference mode: the source photo is also the reference image."""

    kind: ClassVar[str] = "expr_ref"
    uses_reference: ClassVar[bool] = True
    ref_unet: UNet2DConditionModel | None = None

    def build(self, base: Arc2FaceBase, workdir: Path) -> None:
        """The pipeline's set-up (``adapter_pipeline``, DPM-Solver) with this method's adapters."""
        ref_path, _ = find_reference_lora(self.options.get("ref_adapter"), [], base.unet, workdir, self.seed,
                                          int(self.options.get("lora_rank", 16)))
        exp_path, _ = find_expression_adapter(self.options.get("exp_adapter"), ref_path, [], base.unet, workdir,
                                              self.seed)
        self.pipe, self.ref_unet = adapter_pipeline(base, DPMSolverMultistepScheduler.from_config(
            base.scheduler.config), exp_path, ref_path)
        self.pipe.set_ip_adapter_scale(float(self.options.get("scale", 1.0)))
        self.ref_unet.to(self.device)

    def conditions(self, exp: torch.Tensor, reference: torch.Tensor | None) -> dict[str, Any]:
        """Reference mode: the source photo is the reference, read at the configured LoRA scale."""
        return {**super().conditions(exp, reference), "ref_unet": self.ref_unet, "reference": reference,
                "lora_scale": float(self.options.get("lora_scale", 1.0))}

    def close(self) -> None:
        """Free the reference UNet with the pipeline."""
        super().close()
        self.ref_unet = None


METHODS: dict[str, type] = {m.kind: m for m in (Arc2FaceMethod, ExpressionAdapterMethod, ReferenceAdapterMethod,
                                                 FolderMethod)}
Method = Arc2FaceMethod | FolderMethod


def check_method(name: str, cfg: Mapping[str, Any], gen: Mapping[str, Any]) -> None:
    """A method's steps, guidance, size and scales finite and in range, checked before any method loads a model."""
    options = {**gen, **cfg}
    names = {"expression_scale": f"eval.methods.{name}.scale", "reference_scale": f"eval.methods.{name}.lora_scale",
             **{k: f"eval.methods.{name}.{k}" if k in cfg else f"eval.generation.{k}" for k in ("steps", "guidance",
                                                                                             "size")}}
    check_sampling(names, **{k: options[k] for k in ("steps", "guidance", "size") if k in options},
                   expression_scale=options.get("scale", 1.0), reference_scale=options.get("lora_scale", 1.0))


def build_method(name: str, cfg: Mapping[str, Any], base: Mapping[str, Any], gen: Mapping[str, Any],
                 device: str = "cpu", seed: int = 0) -> Method:
    """Build one configured method: ``kind`` picks the class; generation keys in ``cfg`` override ``gen``."""
    options = dict(cfg)
    kind = options.pop("kind", name)
    if kind not in METHODS:
        raise ValueError(f"eval.methods.{name}: unknown kind {kind!r}; choose one of {sorted(METHODS)}")
    if kind == "folder":
        if "path" not in options:
            raise ValueError(f"eval.methods.{name}: a folder method needs path=<folder of generated images>")
        return FolderMethod(name, options["path"])
    fields = GenerationSettings.__dataclass_fields__
    settings = GenerationSettings(**{k: v for k, v in {**gen, **options}.items() if k in fields})
    return METHODS[kind](name, base, settings, device=device, seed=seed,
                         **{k: v for k, v in options.items() if k not in fields})
