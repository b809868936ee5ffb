"""``ExpressionPipeline``: Arc2Face + Expression Adapter (+ Reference Adapter) behind one object, used by the
generate CLI, the demo, the controllability sweep and the notebooks.

It holds a plain diffusers ``StableDiffusionPipeline`` (``.pipe``) with the Expression Adapter attached by diffusers'
own ``load_ip_adapter`` and, when asked for, the Reference Adapter's LoRA ``ref`` (``load_lora_weights``) plus its
reference UNet, found and attached by ``blendexp/models/adapters.py`` as the evaluation's methods are; schedulers,
``set_ip_adapter_scale``, offloading and the like work on ``.pipe`` directly. The annotators (face detector, ArcFace,
SMIRK) are built on first use, so generating from embeddings and FLAME vectors never loads them. Row
``e * num_images + k`` of a call shows expression ``e`` with seed ``seed + k``: every expression starts from the same
noise, so grids compare like with like and transitions stay temporally consistent.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import diffusers
import numpy as np
import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tqdm.auto import tqdm

from blendexp.data.image_sets import is_shards, read_images
from blendexp.faces.align import align_ffhq, arcface_crop
from blendexp.faces.annotators import Annotators, build_annotators
from blendexp.faces.landmarks import alignment_points
from blendexp.faces.detect import ensure_rgb
from blendexp.flame import EXP_DIM, ID_DIM, NamedExpression, check_vector, interpolate, parse_expression
from blendexp.flame import negative_expression as negative_expression_vector
from blendexp.images import load_image
from blendexp.models.arc2face import SD15_HUB_ID, Arc2FaceBase, id_prompt_embeds
from blendexp.models.adapters import (
    DTYPES,
    adapter_pipeline,
    check_pickled_adapter,
    find_expression_adapter,
    find_reference_lora,
)
from blendexp.models.reference_adapter import DEMO_LORA_SCALE
from blendexp.models.sampling import sample
from blendexp.models.tiny import ensure_tiny_base
from blendexp.ranges import check_sampling

log = logging.getLogger(__name__)
REFERENCE_SIZE = 512  # px: the official reference path aligns the reference photo at this size

SCHEDULERS = {"dpm": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "ddpm": "DDPMScheduler",
              "unipc": "UniPCMultistepScheduler"}


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A scheduler by short name (``dpm``, the official demo's, ``ddim``, ``euler``, ...) or diffusers class name."""
    cls = getattr(diffusers, SCHEDULERS.get(name, name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)} or a diffusers "
                         f"scheduler class name")
    return cls.from_config(config)


def official_annotators(models_dir: str | Path) -> dict[str, Any]:
    """Annotator settings for the official layout: SCRFD (else MTCNN), ArcFace ONNX and SMIRK under ``models_dir``."""
    models = Path(models_dir)
    return {"detector": "auto", "detector_dir": str(models / "antelopev2"),
            "arcface": str(models / "antelopev2" / "arcface.onnx"), "smirk": str(models / "smirk" / "SMIRK_em1.pt")}


def _reference_lora(spec: Any, models_dir: Path, unet: UNet2DConditionModel, workdir: Path,
                    seed: int) -> tuple[Path | None, str | None]:
    """(LoRA file or folder, label): None/False is off; True is ``<models>/ref_adapter`` or an untrained LoRA."""
    if spec is None or spec is False:
        return None, None
    return find_reference_lora(None if spec is True else spec, [models_dir / "ref_adapter"], unet, workdir, seed)


def _chunks(n: int, size: int) -> list[range]:
    """``range(n)`` in consecutive pieces of at most ``size`` (images per pipeline call)."""
    return [range(start, min(start + size, n)) for start in range(0, n, max(size, 1))]


@dataclass
class FaceIdentity:
    """Who to generate: the ArcFace embedding for the ID tokens and, from a photo, the aligned face (the reference)."""

    embedding: np.ndarray  # (512,) unit vector
    image: np.ndarray | None  # (S, S, 3) uint8 FFHQ-aligned face; None for an embedding file
    origin: str


class ExpressionPipeline:
    """Identity (ArcFace) × expression (FLAME) → face images, optionally conditioned on a reference photo."""

    def __init__(self, pipe: StableDiffusionPipeline, ref_unet: UNet2DConditionModel | None = None,
                 annotators: Mapping[str, Any] | None = None, sources: Mapping[str, str | None] | None = None) -> None:
        """Wrap a pipeline whose UNet carries the Expression Adapter (and the ``ref`` LoRA when ``ref_unet`` is set)."""
        self.pipe, self.ref_unet = pipe, ref_unet
        self.annotator_cfg = dict(annotators or {})
        self.sources = dict(sources or {})
        self._annotators: Annotators | None = None
        self._warned_toy = False

    @classmethod
    def from_pretrained(cls, models_dir: str | Path, sd15: str | Path = SD15_HUB_ID,
                        expression_adapter: str | Path | None = None, reference_adapter: str | Path | bool | None = None,
                        *, tiny_root: str | Path | None = None, scheduler: str = "dpm",
                        annotators: Mapping[str, Any] | None = None, dtype: str | torch.dtype = "float32",
                        device: str = "cpu", seed: int = 0) -> "ExpressionPipeline":
        """Load the base in the official layout and attach the adapters.

        ``expression_adapter``: an ``exp_adapter`` file or folder, training run folder or ``.ckpt``; None takes the one
        trained with the reference LoRA, else ``<models>/exp_adapter``, else a fresh untrained one (seeded).
        ``reference_adapter``: None/False off; True ``<models>/ref_adapter`` (else an untrained LoRA); or a path.
        ``tiny_root``: write a tiny random base there on first use and load it instead (tests, bug reports).
        ``annotators``: ``build_annotators`` settings (``tiny_root``, ``detector``, ``arcface``, ``smirk``, ...);
        None uses the official layout under ``models_dir``.
        """
        check_pickled_adapter(expression_adapter)
        check_pickled_adapter(reference_adapter)
        if tiny_root:
            models_dir, sd15 = ensure_tiny_base(tiny_root)
        models = Path(models_dir)
        torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        base = Arc2FaceBase.from_pretrained(str(models_dir), str(sd15), dtype=torch_dtype)
        with tempfile.TemporaryDirectory() as tmp:
            ref, ref_label = _reference_lora(reference_adapter, models, base.unet, Path(tmp), seed)
            exp, exp_label = find_expression_adapter(expression_adapter, ref, [models / "exp_adapter"], base.unet,
                                                     Path(tmp), seed)
            pipe, ref_unet = adapter_pipeline(base, make_scheduler(scheduler, base.scheduler.config), exp, ref)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if ref_unet is not None:
            ref_unet.to(device)
        sources = {"models": str(models_dir), "sd15": str(sd15), "expression_adapter": exp_label,
                   "reference_adapter": ref_label, "scheduler": type(pipe.scheduler).__name__}
        return cls(pipe, ref_unet, annotators if annotators is not None else official_annotators(models), sources)

    @property
    def device(self) -> torch.device:
        """Where the UNet runs (generators and inputs are created there)."""
        return self.pipe.unet.device

    @property
    def native_size(self) -> int:
        """The image size the base was trained at (512 for Arc2Face, 64 for the toy and tiny bases)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def annotators(self) -> Annotators:
        """Detector, ArcFace and SMIRK, built on first use from ``annotator_cfg``."""
        if self._annotators is None:
            self._annotators = build_annotators({**self.annotator_cfg, "facenet": None}, str(self.device))
        return self._annotators

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler (same weights), e.g. ``ddim`` for deterministic inversions or ``euler_a`` for variety."""
        self.pipe.scheduler = make_scheduler(name, self.pipe.scheduler.config)
        self.sources["scheduler"] = type(self.pipe.scheduler).__name__

    def _face(self, image: np.ndarray | str | Path, aligned: bool = False) -> tuple[np.ndarray, Any, str]:
        """(RGB image, largest face, origin); no face fails naming the file. ``aligned``: an FFHQ-aligned crop."""
        origin = str(image) if isinstance(image, (str, Path)) else "the given image"
        img = load_image(image) if isinstance(image, (str, Path)) else ensure_rgb(image)
        warning = None if aligned or self._warned_toy else self.annotators.toy_warning(origin)
        if warning:
            log.warning(warning)
            self._warned_toy = True
        face = self.annotators.find_faces([img], aligned)[0]
        if face is None:
            raise ValueError(f"no face found in {origin}; give a photo with one clearly visible face "
                             f"(detector: {self.annotator_cfg.get('detector', 'auto')})")
        return img, face, origin

    def identity_from_image(self, image: np.ndarray | str | Path, size: int | None = None,
                            aligned: bool = False) -> FaceIdentity:
        """Detect the largest face (``aligned``: take the image as an FFHQ-aligned crop), embed its ArcFace crop and
        keep its FFHQ alignment (the Reference Adapter's input)."""
        img, face, origin = self._face(image, aligned)
        embedding = self.annotators.arcface.embed(arcface_crop(img, face.landmarks5)[None])[0]
        return FaceIdentity(embedding, align_ffhq(img, alignment_points(face), size or self.native_size), origin)

    def reference_from_image(self, image: np.ndarray | str | Path, aligned: bool = False) -> FaceIdentity:
        """The official reference path: the photo FFHQ-aligned at 512 px from its face mesh, and the identity
        re-extracted from that aligned face (detected again; the FFHQ template if the detector misses it)."""
        img, face, origin = self._face(image, aligned)
        big = align_ffhq(img, alignment_points(face), REFERENCE_SIZE)
        again = self.annotators.find_faces([big])[0] or self.annotators.find_faces([big], aligned=True)[0]
        embedding = self.annotators.arcface.embed(arcface_crop(big, again.landmarks5)[None])[0]
        return FaceIdentity(embedding, align_ffhq(img, alignment_points(face), self.native_size), origin)

    def expression_from_image(self, image: np.ndarray | str | Path, aligned: bool = False) -> np.ndarray:
        """The (55,) FLAME vector SMIRK reads off the largest face of a driving image."""
        img, face, _ = self._face(image, aligned)
        return self.annotators.smirk.annotate([img], [face])[0]

    def measure_expressions(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, 55) SMIRK re-extraction of generated images, NaN rows where no face is found (controllability)."""
        faces = self.annotators.find_faces(images, self.annotators.generated_aligned(images), generated=True)
        found = self.annotators.smirk.annotate(images, faces)
        return np.stack([np.full(EXP_DIM, np.nan, np.float32) if v is None else v for v in found])

    def load_identity(self, source: FaceIdentity | np.ndarray | str | Path) -> FaceIdentity:
        """An identity from a face photo, an embedding ``.npy`` (512 values), or shards (their first face)."""
        if isinstance(source, FaceIdentity):
            return source
        if isinstance(source, np.ndarray):
            return self.identity_from_image(source)
        path = Path(source).expanduser()
        if path.suffix == ".npy":
            if not path.is_file():
                raise FileNotFoundError(f"identity embedding not found: {path}")
            return FaceIdentity(check_vector(np.load(path, allow_pickle=False), ID_DIM, "identity embedding",
                                             str(path)), None, str(path))
        if is_shards(source):
            items = read_images(str(source), "identity", [], limit=1)
            if not items:
                raise ValueError(f"no readable face in the shards {source}")
            found = self.identity_from_image(items[0].image, aligned=True)  # shard faces are aligned crops
            return FaceIdentity(found.embedding, found.image, items[0].origin)
        if not path.is_file():
            raise FileNotFoundError(f"identity image not found: {path}")
        return self.identity_from_image(path)

    def load_expressions(self, spec: Any) -> list[NamedExpression]:
        """Named (55,) vectors from presets, FLAME files, driving images (SMIRK) or numbers (see ``parse_expression``)."""
        return parse_expression(spec, self.expression_from_image)

    def encode_identity(self, id_emb: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Arc2Face prompt embeddings (1, 77, D) of one ArcFace embedding (512,)."""
        emb = torch.as_tensor(check_vector(np.asarray(id_emb, np.float32), ID_DIM, "identity embedding"))
        return id_prompt_embeds(self.pipe.text_encoder, self.pipe.tokenizer, emb[None].to(self.pipe.text_encoder.device))

    def _reference_pixels(self, reference: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
        """(1, 3, size, size) in [-1, 1] from an aligned uint8 face, as the reference UNet's VAE expects."""
        img = ensure_rgb(reference)
        if img.shape[:2] != (size, size):
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
        pixels = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        return pixels.to(device, self.pipe.unet.dtype)

    @torch.no_grad()
    def __call__(self, id_emb: np.ndarray | FaceIdentity, exp: np.ndarray | Sequence[np.ndarray],
                 reference: np.ndarray | None = None, *, num_images: int = 1, seed: int = 0, steps: int = 25,
                 guidance: float = 3.0, size: int | None = None, expression_scale: float = 1.0,
                 reference_scale: float = DEMO_LORA_SCALE, batch_size: int = 8,
                 negative_expression: Any = None) -> np.ndarray:
        """(E * num_images, S, S, 3) uint8 faces of one identity for E expressions (55,) / (E, 55).

        ``reference``: an aligned face for the Reference Adapter (needs one loaded); None generates without.
        ``expression_scale`` scales the adapter (0: Arc2Face alone); ``reference_scale`` is the LoRA scale;
        ``batch_size`` caps the images per pipeline call (memory). ``negative_expression``: the FLAME vector
        guidance pushes away from (any one-vector expression spec, e.g. a file holding the training set's mean);
        None: zeros, the unconditional vector adapters are trained with.
        """
        num_images, seed, steps, guidance, size, expression_scale, reference_scale, batch_size = check_sampling(
            num_images=num_images, seed=seed, steps=steps, guidance=guidance, size=size,
            expression_scale=expression_scale, reference_scale=reference_scale, batch_size=batch_size).values()
        if isinstance(id_emb, FaceIdentity):
            id_emb = id_emb.embedding
        exps = np.stack([check_vector(e, EXP_DIM, "FLAME vector") for e in np.atleast_2d(np.asarray(exp, np.float32))])
        if reference is not None and self.ref_unet is None:
            raise ValueError("a reference image needs the Reference Adapter: load the pipeline with reference_adapter="
                             "True or a path")
        size = size or self.native_size
        device, dtype = self.device, self.pipe.unet.dtype  # read once: diffusers' device lookup walks every module
        prompt = self.encode_identity(id_emb).to(device, dtype)
        ref = None if reference is None else self._reference_pixels(reference, size, device)
        self.pipe.set_ip_adapter_scale(expression_scale)
        negative = negative_expression_vector(negative_expression, self.expression_from_image)
        # One expression per pipeline call: diffusers broadcasts ``ip_adapter_image_embeds`` over the whole prompt
        # batch, so rows with different expressions in one call would each see every row's tokens.
        jobs = [(e, seeds) for e in range(len(exps)) for seeds in _chunks(num_images, batch_size)]
        out = []
        for e, seeds in tqdm(jobs, desc="generate", disable=None, leave=False):
            out.append(sample(self.pipe, prompt, [seed + k for k in seeds], steps=steps, guidance=guidance, size=size,
                              exp=torch.from_numpy(exps[e:e + 1]).to(device, dtype), negative=negative,
                              ref_unet=self.ref_unet, reference=ref, lora_scale=reference_scale))
        return np.concatenate(out)

    def transition(self, id_emb: np.ndarray | FaceIdentity, keyframes: Sequence[np.ndarray], frames: int = 24,
                   reference: np.ndarray | None = None, ease: str = "linear", **kwargs: Any) -> np.ndarray:
        """(frames, S, S, 3) uint8 along interpolated keyframe expressions, every frame from the same initial noise."""
        return self(id_emb, interpolate(keyframes, frames, ease), reference, num_images=1, **kwargs)
