"""The methods an evaluation compares, built from YAML by ``kind``: ``arc2face`` (no adapter, the baseline),
``expr_adapter`` (Expression Adapter), ``expr_ref`` (Expression + Reference Adapter, reference mode) and
``folder`` (pre-generated images of any other method).

A ``folder`` method holds one image per (source, target, sample) at ``<path>/<source>/<target>_<k>.<ext>``
(``png``/``jpg``/...; names as in the run's ``sources.csv`` / ``targets.csv``, ``k`` = 0 .. samples-1). Generating methods write the
same layout under ``<run>/generations/<method>``, so one run's generations can be scored as another's baseline.
"""

from __future__ import annotations

import logging
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
    resolve_adapter,
    resolve_reference_lora,
    untrained_reference_lora,
)
from blendexp.models.expression_adapter import expression_embeds
from blendexp.models.reference_adapter import generate_with_reference
from blendexp.models.tiny import ensure_tiny_base
from blendexp.ranges import check_sampling

log = logging.getLogger(__name__)


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

    def expression_embeds(self, exp: torch.Tensor) -> list[torch.Tensor]:
        """The FLAME vectors as IP-Adapter image embeddings, the configured negative (else zeros) unconditional."""
        return expression_embeds(exp, self.gen.guidance > 1, self.negative)

    def call(self, prompt: torch.Tensor, exp: torch.Tensor, references: torch.Tensor, **common: Any) -> Any:
        """Run the pipeline for one batch (subclasses add their conditions)."""
        assert self.pipe is not None
        return self.pipe(prompt_embeds=prompt, **common)

    @torch.no_grad()
    def generate(self, id_emb: np.ndarray, exp: np.ndarray, sources: list[np.ndarray], seeds: list[int]
                 ) -> list[np.ndarray]:
        """One (size, size, 3) uint8 image per row of ``id_emb`` (B, 512) / ``exp`` (B, 55), one seed each."""
        assert self.pipe is not None, "call load() first"
        dtype, size = DTYPES[self.gen.dtype], self.gen.size
        pipe = self.pipe
        prompt = id_prompt_embeds(pipe.text_encoder, pipe.tokenizer, torch.from_numpy(id_emb).to(self.device))
        refs = torch.stack([torch.from_numpy(np.array(Image.fromarray(s).resize((size, size), Image.Resampling.BICUBIC)))
                            for s in sources]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        exp_t = torch.from_numpy(exp).to(self.device, dtype)
        images = []
        for i, seed in enumerate(seeds):  # one call per row: diffusers shares precomputed IP embeds across a batch
            out = self.call(prompt[i:i + 1].to(dtype), exp_t[i:i + 1], refs[i:i + 1].to(self.device, dtype),
                            num_inference_steps=self.gen.steps, guidance_scale=self.gen.guidance, height=size,
                            width=size, generator=torch.Generator(self.device).manual_seed(seed), output_type="np")
            images.append((out.images[0] * 255).round().astype(np.uint8))
        return images

    def close(self) -> None:
        """Free the models before the next method loads its own."""
        self.pipe = None


class ExpressionAdapterMethod(Arc2FaceMethod):
    """Arc2Face + Expression Adapter (blendexp-trained or the official ``exp_adapter``)."""

    kind: ClassVar[str] = "expr_adapter"

    def build(self, base: Arc2FaceBase, workdir: Path) -> None:
        """The adapter attached by diffusers' loader, as ``ExpressionPipeline`` does (``adapter_pipeline``)."""
        path = resolve_adapter(self.options.get("adapter"), base.unet, workdir, self.seed)
        self.pipe, _ = adapter_pipeline(base, DPMSolverMultistepScheduler.from_config(base.scheduler.config), path)
        self.pipe.set_ip_adapter_scale(float(self.options.get("scale", 1.0)))

    def call(self, prompt: torch.Tensor, exp: torch.Tensor, references: torch.Tensor, **common: Any) -> Any:
        """Pass the FLAME vectors as IP-Adapter image embeddings."""
        assert self.pipe is not None
        return self.pipe(prompt_embeds=prompt, ip_adapter_image_embeds=self.expression_embeds(exp), **common)


class ReferenceAdapterMethod(Arc2FaceMethod):
    """Expression + Reference Adapter in reference mode: the source photo is also the reference image."""

    kind: ClassVar[str] = "expr_ref"
    ref_unet: UNet2DConditionModel | None = None

    def build(self, base: Arc2FaceBase, workdir: Path) -> None:
        """The pipeline's set-up (``adapter_pipeline``, DPM-Solver) with this method's adapters."""
        ref = self.options.get("ref_adapter")
        ref_path = None if ref is None else resolve_reference_lora(ref)
        exp_path, _ = find_expression_adapter(self.options.get("exp_adapter"), ref_path, [], base.unet, workdir,
                                              self.seed)
        if ref_path is None:
            log.warning("no reference adapter configured: using an untrained LoRA — a plumbing check, not a result")
            ref_path = untrained_reference_lora(base.unet, workdir, self.seed, int(self.options.get("lora_rank", 16)))
        self.pipe, self.ref_unet = adapter_pipeline(base, DPMSolverMultistepScheduler.from_config(
            base.scheduler.config), exp_path, ref_path)
        self.pipe.set_ip_adapter_scale(float(self.options.get("scale", 1.0)))
        self.ref_unet.to(self.device)

    def call(self, prompt: torch.Tensor, exp: torch.Tensor, references: torch.Tensor, **common: Any) -> Any:
        """Reference mode: the reference UNet runs once per image on the source photo."""
        assert self.pipe is not None and self.ref_unet is not None
        return generate_with_reference(self.pipe, self.ref_unet, references, prompt,
                                       lora_scale=float(self.options.get("lora_scale", 1.0)),
                                       ip_adapter_image_embeds=self.expression_embeds(exp), **common)

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
