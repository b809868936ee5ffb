"""Training the Reference Adapter: LoRA on the denoising UNet, which reads a frozen reference UNet's self-attention
inputs, learnt on (reference, target) frame pairs of the same video; the Expression Adapter is loaded and frozen
or trained jointly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from blendexp.models.expression_adapter import (
    EXPORT_DIR,
    attach_expression_adapter,
    load_expression_adapter,
    save_expression_adapter,
    train_adapter,
)
from blendexp.models.reference_adapter import (
    LORA_DIR,
    REFERENCE_KWARG,
    ReferenceStore,
    add_reference_lora,
    add_reference_reader,
    load_reference_lora,
    record_reference,
    reference_lora_parameters,
    reference_unet,
    save_reference_lora,
)
from blendexp.modules.diffusion import DiffusionModule

log = logging.getLogger(__name__)
ID_SOURCES = ("reference", "target")


class ReferenceAdapterModule(DiffusionModule):
    """Noise-prediction training of the reference LoRA with ID/expression/reference dropout for CFG.

    Batches carry the target (``pixel_values`` or ``latents``, ``id``, ``exp``) and its reference frame
    (``ref_pixel_values`` or ``ref_latents``, ``ref_id``). ``id_source`` picks whose ArcFace embedding makes the ID
    tokens of both UNets: ``reference`` matches inference, where the one input photo gives the ID and the reference.
    """

    uses_reference = True  # SampleGrid passes each identity's own image as the reference

    def __init__(self, base: dict[str, Any], lora: dict[str, Any], noise: dict[str, Any], dropout: dict[str, float],
                 optim: dict[str, Any], adapter: dict[str, Any] | None = None, expression_adapter: str | None = None,
                 train_expression: bool | None = None, init_lora: str | None = None,
                 id_source: str = "reference", gradient_checkpointing: bool = False) -> None:
        super().__init__(base=base, noise=noise, dropout=dropout, optim=optim,
                         gradient_checkpointing=gradient_checkpointing)
        self.save_hyperparameters()
        if id_source not in ID_SOURCES:
            raise ValueError(f"model.id_source={id_source!r}; choose one of {ID_SOURCES}")
        if train_expression is None:
            train_expression = expression_adapter is None
        if not train_expression and expression_adapter is None:
            raise ValueError("model.train_expression=false needs a trained adapter: set model.expression_adapter to an "
                             "exp_adapter .bin/.safetensors (or its folder), or let it train jointly")
        self.train_expression, self.id_source = train_expression, id_source
        self.ref_unet = reference_unet(self.unet)  # copied before any adapter is attached
        if expression_adapter:
            self.hparams["adapter"] = {**(adapter or {}), **load_expression_adapter(self.unet, expression_adapter)}
        else:
            attach_expression_adapter(self.unet, **(adapter or {}))
        if init_lora:
            load_reference_lora(self.unet, init_lora)
            log.info("rank, alpha and targets come from %s; model.lora is not used", init_lora)
        else:
            add_reference_lora(self.unet, **lora)
        add_reference_reader(self.unet)
        # After peft, which leaves only LoRA weights trainable when it attaches an adapter.
        train_adapter(self.unet, train_expression)
        for p in reference_lora_parameters(self.unet):
            p.requires_grad_(True)

    @torch.no_grad()
    def reference_store(self, batch: dict[str, Any], id_states: torch.Tensor, keep: torch.Tensor) -> ReferenceStore:
        """Run the reference UNet once on the kept rows' reference frames; the other rows will not read."""
        if not keep.any():
            return ReferenceStore()
        ref_latents = self.encode_latents(batch, prefix="ref_")
        store = record_reference(self.ref_unet, ref_latents[keep], id_states[keep])
        return store.expand(read_rows=None if keep.all() else keep)

    def forward_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Diffusion loss for a batch of (reference, target) pairs; ``both`` drops ID, expression and reference."""
        latents = self.encode_latents(batch)
        n = latents.shape[0]
        drop_all = self.drop_mask("both", n)
        drop_id, drop_exp, drop_ref = (self.drop_mask(key, n) | drop_all for key in ("id", "exp", "ref"))
        id_states = self.id_embeds(batch["ref_id" if self.id_source == "reference" else "id"].to(self.dtype))
        encoder_states = torch.where(drop_id[:, None, None], self.empty_embeds.to(id_states.dtype), id_states)
        exp = torch.where(drop_exp[:, None], torch.zeros_like(batch["exp"]), batch["exp"]).to(self.dtype)
        conditions = {"added_cond_kwargs": {"image_embeds": [exp[:, None, :]]},
                      "cross_attention_kwargs": {REFERENCE_KWARG: self.reference_store(batch, id_states, ~drop_ref)}}

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy, t, encoder_states, **conditions).sample

        return self.diffusion_loss(latents, predict)

    def export(self, folder: str | Path) -> list[Path]:
        """Write ``models/ref_adapter/pytorch_lora_weights.safetensors`` (``load_lora_weights``) and, if trained here,
        ``models/exp_adapter/`` (``load_ip_adapter``): the official demo's folders."""
        files = [save_reference_lora(self.unet, Path(folder) / "models" / LORA_DIR)]
        if self.train_expression:
            files += save_expression_adapter(self.unet, Path(folder) / "models" / EXPORT_DIR)
        return files

    def row_conditions(self, exp: torch.Tensor, reference: torch.Tensor | None, i: int) -> dict[str, Any]:
        """Row ``i``'s expression and, in reference mode, its own reference (at the trained LoRA scale)."""
        ref = None if reference is None else reference[i:i + 1].to(self.device, self.dtype)
        return {"exp": exp[i:i + 1], "ref_unet": self.ref_unet, "reference": ref}
