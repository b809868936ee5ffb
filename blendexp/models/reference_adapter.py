"""Reference Adapter: reference attention through diffusers attention processors, plus LoRA on the denoiser.

A frozen copy of the base UNet (the *reference UNet*) runs once per image at timestep 0 on the reference's clean
latents with the same ID tokens; a write processor on each of its self-attentions (``attn1``) records that layer's
input. On the denoising UNet a read processor appends the recorded states of the same-named layer to its
self-attention keys and values. The recordings travel per call in a :class:`ReferenceStore` passed as
``cross_attention_kwargs={"reference": store}``: nothing is kept in module or global state. Under classifier-free
guidance only the conditional rows read; the unconditional rows do plain self-attention (as the official demo).

The denoiser's LoRA is peft's (``unet.add_adapter``) on ``to_q``/``to_k``/``to_v``/``to_out.0``; the processors call
those layers, so LoRA applies to the reference keys too. It is saved as ``pytorch_lora_weights.safetensors`` in
diffusers' format, which ``pipe.load_lora_weights(folder, adapter_name="ref")`` loads.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from blendexp.checkpoints import adapter_folder

log = logging.getLogger(__name__)

REFERENCE_KWARG = "reference"
ADAPTER_NAME = "ref"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_DIR = "ref_adapter"  # the official release's models/ref_adapter/pytorch_lora_weights.safetensors
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The official demo's reference mode: DPM-Solver multistep, 25 steps, guidance 3.0, LoRA scale 0.8.
DEMO_STEPS, DEMO_GUIDANCE, DEMO_LORA_SCALE = 25, 3.0, 0.8


class _QuietReferenceKwarg(logging.Filter):
    """Drop diffusers' per-call warning that cross-attention processors ignore ``reference``.

    ``Attention.forward`` hands each processor only the kwargs named in its ``__call__`` signature (``**kwargs``
    does not count) and warns, on every call, about the rest. The store reaches every attention layer, but only
    the self-attention processors use it; for all others (e.g. the Expression Adapter's IP processors) dropping
    it is exactly right, so only that one warning is silenced.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record except the warning that lists ``reference`` as the only unexpected kwarg."""
        return f"cross_attention_kwargs ['{REFERENCE_KWARG}'] are not expected" not in record.getMessage()


logging.getLogger("diffusers.models.attention_processor").addFilter(_QuietReferenceKwarg())


@dataclass
class ReferenceStore:
    """One call's reference recordings: self-attention inputs keyed by layer name, and which rows read them."""

    states: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> (R, L, C)
    # (N,) bool over the denoising batch, R of them True, or a slice of R consecutive rows (CFG's conditional half,
    # read without gathers); None: all N rows read
    read_rows: torch.Tensor | slice | None = None

    def expand(self, repeats: int = 1, read_rows: torch.Tensor | slice | None = None) -> "ReferenceStore":
        """These recordings for a denoising batch: each repeated ``repeats`` times (``num_images_per_prompt``
        order) and read only by ``read_rows``, checked here once rather than in every layer."""
        states = {k: v.repeat_interleave(repeats, 0) for k, v in self.states.items()} if repeats > 1 else self.states
        n = next(iter(states.values())).shape[0] if states else 0
        selected = None if read_rows is None else (
            read_rows.stop - read_rows.start if isinstance(read_rows, slice) else int(read_rows.sum()))
        if selected is not None and selected != n:
            raise ValueError(f"read_rows selects {selected} rows but the store holds {n} references")
        return ReferenceStore(states, read_rows)


class _ReferenceProcessor:
    """Wraps the layer's existing self-attention processor; ``name`` pairs writer and reader layers."""

    def __init__(self, name: str, inner: Callable[..., torch.Tensor]) -> None:
        self.name, self.inner = name, inner


class ReferenceWriteProcessor(_ReferenceProcessor):
    """On the reference UNet: record this layer's input in the store, then attend as usual."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, reference: ReferenceStore | None = None) -> torch.Tensor:
        """Store ``hidden_states`` (B, L, C) under this layer's name; the output is plain self-attention."""
        if reference is not None:
            reference.states[self.name] = hidden_states
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceReadProcessor(_ReferenceProcessor):
    """On the denoising UNet: self-attention whose keys/values also cover the recorded reference states."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, reference: ReferenceStore | None = None) -> torch.Tensor:
        """Rows in ``read_rows`` attend over [own tokens, reference tokens]; the others, and any call without
        recordings, do plain self-attention."""
        if reference is None or not reference.states:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.name not in reference.states:
            raise KeyError(f"reference store has no states for layer {self.name}; was the reference UNet built "
                           f"(reference_unet) from the same base as the denoising UNet?")
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: reference attention applies to unmasked self-attention only")
        ref = reference.states[self.name].to(hidden_states.dtype)
        rows = reference.read_rows
        if rows is None or ref.shape[0] == hidden_states.shape[0]:
            return self._read(attn, hidden_states, ref)
        if isinstance(rows, slice):  # one block of reading rows: views, no gathers
            before, after = hidden_states[:rows.start], hidden_states[rows.stop:]
            parts = [self.inner(attn, before) if len(before) else None, self._read(attn, hidden_states[rows], ref),
                     self.inner(attn, after) if len(after) else None]
            return torch.cat([p for p in parts if p is not None])
        if rows.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"{self.name}: read_rows covers {rows.shape[0]} rows, the batch has {hidden_states.shape[0]}")
        # Reading rows first, each group in batch order; a sort rather than nonzero() keeps GPUs free of syncs.
        order = (~rows).to(torch.uint8).argsort(stable=True)
        read, plain = order[:ref.shape[0]], order[ref.shape[0]:]
        out = torch.cat([self._read(attn, hidden_states[read], ref), self.inner(attn, hidden_states[plain])])
        return out[order.argsort()]

    def _read(self, attn: Attention, hidden_states: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Queries from this row's tokens, keys/values from its tokens followed by its reference's."""
        if ref.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"{self.name}: {ref.shape[0]} reference rows for a batch of {hidden_states.shape[0]}")
        return self.inner(attn, hidden_states, torch.cat([hidden_states, ref], dim=1))


def _install(unet: UNet2DConditionModel, kind: type[_ReferenceProcessor]) -> None:
    """Wrap every self-attention processor of ``unet`` in ``kind`` (idempotent; other processors stay)."""
    procs = dict(unet.attn_processors)
    wrap = [k for k, proc in procs.items() if k.endswith("attn1.processor") and not isinstance(proc, kind)]
    for key in wrap:
        if isinstance(procs[key], _ReferenceProcessor):
            raise ValueError(f"{key} already has a {type(procs[key]).__name__}; a UNet either writes or reads references")
        procs[key] = kind(key.removesuffix(".processor"), procs[key])
    if wrap:
        unet.set_attn_processor(procs)


def add_reference_reader(unet: UNet2DConditionModel) -> None:
    """Make ``unet`` read reference states; install after ``load_ip_adapter``, which resets every processor."""
    _install(unet, ReferenceReadProcessor)


def reference_unet(base_unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A frozen copy of the plain base UNet that records its self-attention inputs (the reference UNet)."""
    if getattr(base_unet, "peft_config", None) or base_unet.encoder_hid_proj is not None:
        raise ValueError("the reference UNet must be a copy of the plain base UNet; build it before attaching LoRA "
                         "or the Expression Adapter, or load it from <models>/arc2face")
    unet = copy.deepcopy(base_unet).requires_grad_(False).eval()
    _install(unet, ReferenceWriteProcessor)
    return unet


@torch.no_grad()
def record_reference(ref_unet: UNet2DConditionModel, latents: torch.Tensor,
                     encoder_hidden_states: torch.Tensor) -> ReferenceStore:
    """Run the reference UNet once at timestep 0 on clean latents (R, 4, h, w) with their ID tokens (R, 77, D)."""
    store = ReferenceStore()
    t = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
    ref_unet(latents.to(ref_unet.dtype), t, encoder_hidden_states.to(ref_unet.dtype),
             cross_attention_kwargs={REFERENCE_KWARG: store}, return_dict=False)
    if not store.states:
        raise ValueError("the reference UNet recorded nothing: build it with reference_unet(base_unet)")
    return store


def encode_reference(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Clean latents (B, 4, h, w) of reference images (B, 3, H, W) in [-1, 1]: the posterior mean, deterministic."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    return latents * vae.config.scaling_factor


def add_reference_lora(unet: UNet2DConditionModel, rank: int = 16, alpha: float = 16,
                       target_modules: tuple[str, ...] | list[str] = LORA_TARGETS) -> list[torch.nn.Parameter]:
    """Attach a fresh LoRA (B = 0, so the UNet starts as the base) named ``ref`` and return its parameters."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights="gaussian")
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return reference_lora_parameters(unet)


def reference_lora_parameters(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    """The LoRA weights of the ``ref`` adapter (what the Reference Adapter trains)."""
    params = [p for n, p in unet.named_parameters() if ".lora_" in n and f".{ADAPTER_NAME}." in n]
    if not params:
        raise ValueError(f"the UNet has no LoRA adapter named {ADAPTER_NAME!r}")
    return params


def has_lora(folder: Path) -> bool:
    """True for a folder holding ``pytorch_lora_weights.safetensors``."""
    return (folder / LORA_WEIGHT_NAME).is_file()


def lora_file(path: str | Path) -> Path:
    """The ``ref`` LoRA file given as itself or as any folder above it (``ref_adapter/``, ``models/``, a run)."""
    path = Path(path)
    if path.is_file():
        return path
    folder = adapter_folder(path, LORA_DIR, has_lora, "reference adapter",
                            f"a {LORA_WEIGHT_NAME} file, a folder holding one (e.g. <models>/{LORA_DIR}), a models/ "
                            f"folder or a ref_adapter training run folder")
    return folder / LORA_WEIGHT_NAME


def load_reference_lora(unet: UNet2DConditionModel, path: str | Path) -> LoraConfig:
    """Attach an official or blendexp ``ref`` LoRA to ``unet`` with diffusers' own loader (to evaluate or fine-tune)."""
    file = lora_file(path)
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name=ADAPTER_NAME, metadata=metadata)
    if ADAPTER_NAME not in getattr(unet, "peft_config", {}):
        raise ValueError(f"{file} holds no UNet LoRA weights (keys start with {sorted(state)[:3]})")
    config = unet.peft_config[ADAPTER_NAME]
    log.info("loaded reference LoRA %s (rank %s, alpha %s, targets %s)", file, config.r, config.lora_alpha,
             sorted(config.target_modules))
    return config


def save_reference_lora(unet: UNet2DConditionModel, folder: str | Path) -> Path:
    """Write the ``ref`` LoRA as ``pytorch_lora_weights.safetensors`` (diffusers' format) with its alpha folded into
    the up weights (alpha = rank in the metadata): diffusers versions that ignore the metadata, such as the 0.29.2
    the official release pins, then run it at the strength it was trained at."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.lora_B:
            state[f"{name}.lora_B.weight"] = state[f"{name}.lora_B.weight"] * module.scaling[ADAPTER_NAME]
    state = convert_state_dict_to_diffusers(state)
    config = unet.peft_config[ADAPTER_NAME]
    metadata = {**config.to_dict(), "lora_alpha": config.r, "alpha_pattern": dict(config.rank_pattern),
                "use_rslora": False}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME,
                                              unet_lora_adapter_metadata=metadata, safe_serialization=True)
    return Path(folder) / LORA_WEIGHT_NAME


@torch.no_grad()
def generate_with_reference(pipe: StableDiffusionPipeline, ref_unet: UNet2DConditionModel,
                            reference: torch.Tensor | None, prompt_embeds: torch.Tensor, *,
                            lora_scale: float | None = DEMO_LORA_SCALE, adapter_name: str = ADAPTER_NAME,
                            num_inference_steps: int = DEMO_STEPS, guidance_scale: float = DEMO_GUIDANCE,
                            num_images_per_prompt: int = 1, **kwargs: Any) -> Any:
    """Call a plain diffusers pipeline in reference mode, running the reference UNet once per image, not per step.

    ``reference`` (B, 3, H, W) in [-1, 1] pairs with ``prompt_embeds`` (B, 77, D); ``None`` generates without a
    reference (LoRA scale 0, as the demo does). ``lora_scale=None`` leaves the adapter scales as they are.
    Other keyword arguments (``ip_adapter_image_embeds``, ``generator``, ...) go to the pipeline unchanged.
    """
    call = dict(prompt_embeds=prompt_embeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt, **kwargs)
    if reference is None and lora_scale is not None:  # LoRA off: the base weights alone, as scale 0 gives
        pipe.unet.disable_adapters()
        try:
            return pipe(**call)
        finally:
            pipe.unet.enable_adapters()
    if reference is None:
        return pipe(**call)
    if lora_scale is not None:
        pipe.set_adapters([adapter_name], [lora_scale])
    if reference.shape[0] != prompt_embeds.shape[0]:
        raise ValueError(f"{reference.shape[0]} reference images for {prompt_embeds.shape[0]} prompts; pass one each")
    add_reference_reader(pipe.unet)
    store = record_reference(ref_unet, encode_reference(pipe.vae, reference), prompt_embeds)
    rows = None
    if guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None:  # the pipeline's CFG: [uncond, cond]
        n = prompt_embeds.shape[0] * num_images_per_prompt
        rows = slice(n, 2 * n)
    store = store.expand(num_images_per_prompt, rows)
    with fused_lora(pipe.unet, adapter_name):
        return pipe(**call, cross_attention_kwargs={REFERENCE_KWARG: store})


@contextlib.contextmanager
def fused_lora(unet: UNet2DConditionModel, adapter_name: str = ADAPTER_NAME) -> Iterator[None]:
    """The LoRA merged into its base weights for one call (no LoRA matmuls per step), those weights restored exactly
    afterwards (a copy, not a subtraction, which would leave rounding behind)."""
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer) and adapter_name in m.lora_A]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    for m in layers:
        m.merge(adapter_names=[adapter_name])
    try:
        yield
    finally:
        for m, w in zip(layers, saved):  # peft's unmerge() would subtract first, only to be overwritten
            m.get_base_layer().weight.data.copy_(w)
            m.merged_adapters.remove(adapter_name)
