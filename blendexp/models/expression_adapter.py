"""Expression Adapter: the 55-d FLAME vector → K tokens → decoupled (IP-Adapter) cross-attention.

Built from diffusers' own parts: the projection is ``ImageProjection`` (the plain IP-Adapter format, always
4 tokens), ``IPAdapterFaceIDImageProjection`` (an MLP, any token count) or ``IPAdapterFullImageProjection`` (the
"Full" MLP, one token), wrapped in ``MultiIPAdapterImageProjection`` as ``unet.encoder_hid_proj``; every
cross-attention gets ``IPAdapterAttnProcessor2_0`` with ``to_k_ip``/``to_v_ip`` initialised from its ``to_k``/``to_v``.
The saved ``{"image_proj", "ip_adapter"}`` dict is what ``StableDiffusionPipeline.load_ip_adapter`` converts, and
checkpoints are read back through that same converter.

FLAME groups differ ~10x in magnitude (SMIRK: expression coefficients about +-3, eyelids 0..1, jaw pose a few tenths
of a radian), so with Adam's per-weight step the jaw's projection columns learn ~10x slower than the rest. An
``input_scale`` per group trains the projection's first layer as if it read the scaled vector (a torch
parametrization, ``weight = original * scale``); the layer itself still reads raw FLAME, so exports stay in the
official format.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterFaceIDImageProjection,
    IPAdapterFullImageProjection,
    MultiIPAdapterImageProjection,
)
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from blendexp.checkpoints import adapter_folder, load_weights_only
from blendexp.flame import EXP_DIM, GROUPS

log = logging.getLogger(__name__)

PROJECTIONS = ("linear", "mlp", "full")
LINEAR_TOKENS = 4  # diffusers reads a plain ``proj.weight`` adapter as exactly 4 tokens
WEIGHT_NAME = "exp_adapter"
EXPORT_DIR = "exp_adapter"  # the official release's models/exp_adapter/exp_adapter.bin


def _ip_layers(unet: UNet2DConditionModel) -> list[tuple[str, Attention]]:
    """The cross-attention layers (attn2) in ``attn_processors`` order, the order of the official key ids."""
    return [(name, unet.get_submodule(name.removesuffix(".processor")))
            for name in unet.attn_processors if not name.endswith("attn1.processor")]


def make_projection(cross_dim: int, num_tokens: int, projection: str, mult: int = 4) -> torch.nn.Module:
    """Build the FLAME→tokens projection; diffusers' formats fix the linear one at 4 tokens, the "Full" one at 1."""
    if projection == "full":
        if num_tokens != 1:
            raise ValueError(f"projection=full is IP-Adapter's \"Full\" format, which always means 1 token; got "
                             f"num_tokens={num_tokens}. Use projection=mlp for other counts")
        return IPAdapterFullImageProjection(image_embed_dim=EXP_DIM, cross_attention_dim=cross_dim)
    if projection == "linear":
        if num_tokens != LINEAR_TOKENS:
            raise ValueError(f"projection=linear exports diffusers' plain IP-Adapter format, which always means "
                             f"{LINEAR_TOKENS} tokens; got num_tokens={num_tokens}. Use projection=mlp for other counts")
        return ImageProjection(image_embed_dim=EXP_DIM, cross_attention_dim=cross_dim, num_image_text_embeds=num_tokens)
    if projection == "mlp":
        return IPAdapterFaceIDImageProjection(image_embed_dim=EXP_DIM, cross_attention_dim=cross_dim, mult=mult,
                                              num_tokens=num_tokens)
    raise ValueError(f"unknown projection {projection!r}; choose one of {PROJECTIONS}")


class InputScale(nn.Module):
    """``weight = original * scale`` per input column: Adam steps each FLAME group at its own magnitude."""

    def __init__(self, scale: torch.Tensor) -> None:
        """Hold the (55,) factors as a buffer (moves with the module's device and dtype)."""
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        """The weight the layer applies to raw FLAME vectors."""
        return original * self.scale

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The trained tensor that gives ``weight`` (used when a weight is assigned)."""
        return weight / self.scale


def input_scale_vector(scales: dict[str, float]) -> torch.Tensor:
    """(55,) per-component factors from per-group ones (groups: exp, eyelid, jaw; unnamed groups 1)."""
    unknown = sorted(set(scales) - set(GROUPS))
    if unknown:
        raise ValueError(f"input_scale: unknown FLAME group(s) {unknown}; use {sorted(GROUPS)}")
    vec = torch.ones(EXP_DIM)
    for group, factor in scales.items():
        if not float(factor) > 0:
            raise ValueError(f"input_scale.{group}={factor}: factors must be positive")
        vec[GROUPS[group]] = float(factor)
    return vec


def _input_layer(unet: UNet2DConditionModel) -> nn.Linear:
    """The projection's first Linear, the only layer that sees the raw 55-d vector."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    return proj.image_embeds if isinstance(proj, ImageProjection) else proj.ff.net[0].proj


def scale_adapter_input(unet: UNet2DConditionModel, scales: dict[str, float], keep_weights: bool) -> None:
    """Train the projection as if its input were scaled per group; ``keep_weights`` keeps a loaded adapter's
    function, otherwise the layer starts as a fresh one reading the scaled vector (input standardisation)."""
    layer = _input_layer(unet)
    init = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", InputScale(input_scale_vector(scales).to(init)))
    if not keep_weights:
        with torch.no_grad():
            layer.parametrizations.weight.original.copy_(init)


def fold_input_scale(state: dict[str, torch.Tensor], scales: dict[str, float] | None) -> dict[str, torch.Tensor]:
    """A checkpoint's parametrised input layer (``...parametrizations.weight.original``) as its plain weight."""
    suffix = ".parametrizations.weight.original"
    if not any(k.endswith(suffix) for k in state):
        return state
    if scales is None:
        raise ValueError("checkpoint has an input-scaled Expression Adapter but its hyper-parameters carry no "
                         "adapter.input_scale to fold it with")
    vec, out = input_scale_vector(scales), {}
    for key, value in state.items():
        if key.endswith(suffix):
            out[key.removesuffix(suffix) + ".weight"] = value * vec
        else:
            out[key] = value
    return out


def attach_expression_adapter(unet: UNet2DConditionModel, num_tokens: int = 4, projection: str = "linear",
                              mult: int = 4, scale: float = 1.0,
                              input_scale: dict[str, float] | None = None) -> list[torch.nn.Parameter]:
    """Install a freshly initialised adapter on ``unet`` (its input layer trained at ``input_scale`` per FLAME
    group when given) and return its (trainable) parameters."""
    proj = make_projection(unet.config.cross_attention_dim, num_tokens, projection, mult).to(unet.device, unet.dtype)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([proj])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    procs = dict(unet.attn_processors)
    for name, attn in _ip_layers(unet):
        proc = IPAdapterAttnProcessor2_0(hidden_size=attn.to_k.out_features, cross_attention_dim=attn.to_k.in_features,
                                         num_tokens=(num_tokens,), scale=scale)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
            proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
        procs[name] = proc.to(unet.device, unet.dtype)
    unet.set_attn_processor(procs)
    if input_scale:
        scale_adapter_input(unet, input_scale, keep_weights=False)
    return adapter_parameters(unet)


def adapter_parameters(unet: UNet2DConditionModel) -> list[torch.nn.Parameter]:
    """Parameters of the attached adapter (projection and every ``to_k_ip``/``to_v_ip``)."""
    params = list(unet.encoder_hid_proj.parameters())
    for name, _ in _ip_layers(unet):
        params += list(unet.attn_processors[name].parameters())
    return params


def train_adapter(unet: UNet2DConditionModel, train: bool = True) -> None:
    """Let the adapter learn (or freeze it); a single token's ``to_k_ip`` stays frozen: attention over one key is 1
    whatever the key, so its gradient is rounding noise that Adam would blow up to full-size steps."""
    for p in adapter_parameters(unet):
        p.requires_grad_(train)
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    with torch.no_grad():  # (diffusers records 257 tokens for a loaded "Full" projection; its output says 1)
        tokens = proj(torch.zeros(1, EXP_DIM, device=unet.device, dtype=unet.dtype)).shape[-2]
    if tokens == 1:
        for name, _ in _ip_layers(unet):
            unet.attn_processors[name].to_k_ip.requires_grad_(False)


def _projection_keys(projection: torch.nn.Module) -> dict[str, str]:
    """diffusers parameter name → official (IP-Adapter) key of the projection."""
    if isinstance(projection, ImageProjection):
        return {"image_embeds.weight": "proj.weight", "image_embeds.bias": "proj.bias",
                "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    norm = "proj.3" if isinstance(projection, IPAdapterFullImageProjection) else "norm"
    return {"ff.net.0.proj.weight": "proj.0.weight", "ff.net.0.proj.bias": "proj.0.bias",
            "ff.net.2.weight": "proj.2.weight", "ff.net.2.bias": "proj.2.bias",
            "norm.weight": f"{norm}.weight", "norm.bias": f"{norm}.bias"}


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """``module``'s tensor at dotted ``name`` as the forward pass sees it (a parametrised weight included)."""
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr)


def expression_adapter_state_dict(unet: UNet2DConditionModel) -> dict[str, dict[str, torch.Tensor]]:
    """The attached adapter in the official ``{"image_proj", "ip_adapter"}`` key format."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    image_proj = {official: _tensor(proj, ours).detach().cpu().contiguous()
                  for ours, official in _projection_keys(proj).items()}
    ip_adapter: dict[str, torch.Tensor] = {}
    for i, (name, _) in enumerate(_ip_layers(unet)):
        proc = unet.attn_processors[name]
        key_id = 2 * i + 1  # attn1/attn2 alternate in the original module list; diffusers counts the same way
        ip_adapter[f"{key_id}.to_k_ip.weight"] = proc.to_k_ip[0].weight.detach().cpu().contiguous()
        ip_adapter[f"{key_id}.to_v_ip.weight"] = proc.to_v_ip[0].weight.detach().cpu().contiguous()
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def save_expression_adapter(unet: UNet2DConditionModel, folder: str | Path) -> list[Path]:
    """Write ``exp_adapter.bin`` and ``exp_adapter.safetensors`` (same tensors) for ``load_ip_adapter``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = expression_adapter_state_dict(unet)
    torch.save(state, folder / f"{WEIGHT_NAME}.bin")
    flat = {f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}
    save_file(flat, folder / f"{WEIGHT_NAME}.safetensors", metadata={"format": "pt"})
    return [folder / f"{WEIGHT_NAME}.bin", folder / f"{WEIGHT_NAME}.safetensors"]


def adapter_file(folder: Path) -> Path | None:
    """``folder``'s ``exp_adapter.safetensors``, else its ``exp_adapter.bin``, else None."""
    return next((f for f in (folder / f"{WEIGHT_NAME}.safetensors", folder / f"{WEIGHT_NAME}.bin") if f.is_file()), None)


def has_adapter(folder: Path) -> bool:
    """True for a folder holding ``exp_adapter.safetensors`` or ``.bin``."""
    return adapter_file(folder) is not None


def read_expression_adapter(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """Read an adapter file (.safetensors or .bin, or a folder holding one) without unpickling objects."""
    path = Path(path)
    if path.is_dir():
        folder = adapter_folder(path, EXPORT_DIR, has_adapter, "expression adapter",
                                f"a folder holding {WEIGHT_NAME}.safetensors or {WEIGHT_NAME}.bin")
        path = adapter_file(folder)
    if not path.is_file():
        raise FileNotFoundError(f"expression adapter checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in load_file(path).items():
            part, _, rest = key.partition(".")
            state.setdefault(part, {})[rest] = value
    else:
        state = load_weights_only(path)
    if set(state) < {"image_proj", "ip_adapter"}:
        raise ValueError(f"{path} is not an IP-Adapter checkpoint: expected 'image_proj' and 'ip_adapter' entries")
    return state


def describe_projection(projection: nn.Module) -> dict[str, int | str]:
    """Projection type, token count and MLP width of an attached projection (``attach_expression_adapter``'s terms)."""
    if isinstance(projection, ImageProjection):
        return {"projection": "linear", "num_tokens": projection.num_image_text_embeds}
    if isinstance(projection, IPAdapterFullImageProjection):
        return {"projection": "full", "num_tokens": 1}
    if isinstance(projection, IPAdapterFaceIDImageProjection):
        first = projection.ff.net[0].proj
        return {"projection": "mlp", "num_tokens": projection.num_tokens, "mult": first.out_features // first.in_features}
    raise ValueError(f"{type(projection).__name__} is not a projection of the {EXP_DIM}-d FLAME vector; "
                     f"supported: IP-Adapter's plain, Full and FaceID forms")


def load_expression_adapter(unet: UNet2DConditionModel, path: str | Path, scale: float = 1.0) -> dict[str, int | str]:
    """Attach an adapter from an official or blendexp checkpoint (to evaluate or fine-tune it) through diffusers'
    own converter, the one ``load_ip_adapter`` runs: every IP-Adapter projection format it reads for a 55-d input."""
    state = read_expression_adapter(path)
    layers = _ip_layers(unet)
    if len(state["ip_adapter"]) != 2 * len(layers):
        raise ValueError(f"{path}: {len(state['ip_adapter'])} ip_adapter tensors for a UNet with {len(layers)} "
                         f"cross-attention layers (expected {2 * len(layers)}); was it trained on another base?")
    first = state["image_proj"].get("proj.weight", state["image_proj"].get("proj.0.weight"))
    if first is not None and (width := first.shape[1]) != EXP_DIM:  # checked before the UNet is changed
        raise ValueError(f"{path} projects a {width}-d input (an image adapter?); the Expression Adapter reads the "
                         f"{EXP_DIM}-d FLAME vector")
    try:
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"{path} does not fit this base's cross-attention layers ({err}); was it trained on "
                         f"another base?") from err
    cfg = describe_projection(unet.encoder_hid_proj.image_projection_layers[0])
    procs = unet.attn_processors
    for name, _ in layers:
        procs[name].scale = [scale]
    log.info("loaded expression adapter %s (%s)", path, cfg)
    return cfg


def expression_embeds(exp: torch.Tensor, do_cfg: bool,
                      negative: np.ndarray | torch.Tensor | None = None) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for a pipeline call: [(2B, 1, 55)] with the unconditional rows first under CFG
    (``negative``, a (55,) FLAME vector; None: zeros, the dropout value adapters are trained with), else [(B, 1, 55)]."""
    exp = exp[:, None, :]
    if not do_cfg:
        return [exp]
    uncond = (torch.zeros_like(exp) if negative is None
              else torch.as_tensor(negative).reshape(1, 1, -1).to(exp).expand_as(exp))
    return [torch.cat([uncond, exp])]
