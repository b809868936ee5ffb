"""Training the Expression Adapter: frozen Arc2Face, only the FLAME projection and ``to_k_ip``/``to_v_ip`` learn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from blendexp.models.expression_adapter import (
    attach_expression_adapter,
    EXPORT_DIR,
    load_expression_adapter,
    save_expression_adapter,
    scale_adapter_input,
    train_adapter,
)
from blendexp.modules.diffusion import DiffusionModule


class ExpressionAdapterModule(DiffusionModule):
    """Noise-prediction training of the Expression Adapter with ID/expression dropout for CFG."""

    def __init__(self, base: dict[str, Any], adapter: dict[str, Any], noise: dict[str, Any],
                 dropout: dict[str, float], optim: dict[str, Any], init_adapter: str | None = None,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__(base=base, noise=noise, dropout=dropout, optim=optim,
                         gradient_checkpointing=gradient_checkpointing)
        self.save_hyperparameters()
        if init_adapter:  # its file decides the projection: recorded, so a .ckpt of this run exports in its format
            self.hparams["adapter"] = {**adapter, **load_expression_adapter(self.unet, init_adapter)}
            if adapter.get("input_scale"):
                scale_adapter_input(self.unet, adapter["input_scale"], keep_weights=True)
        else:
            attach_expression_adapter(self.unet, **adapter)
        train_adapter(self.unet)

    def forward_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Diffusion loss for one batch of (image, id, exp); dropped expressions become zeros."""
        latents = self.encode_latents(batch)
        n = latents.shape[0]
        drop_both = self.drop_mask("both", n)
        drop_id, drop_exp = self.drop_mask("id", n) | drop_both, self.drop_mask("exp", n) | drop_both
        encoder_states = self.id_embeds(batch["id"].to(self.dtype), drop_id)
        exp = torch.where(drop_exp[:, None], torch.zeros_like(batch["exp"]), batch["exp"]).to(self.dtype)

        def predict(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.unet(noisy, t, encoder_states, added_cond_kwargs={"image_embeds": [exp[:, None, :]]}).sample

        return self.diffusion_loss(latents, predict)

    def export(self, folder: str | Path) -> list[Path]:
        """Write ``models/exp_adapter/exp_adapter.{bin,safetensors}``, where the official demo's ``load_ip_adapter``
        reads it."""
        return save_expression_adapter(self.unet, Path(folder) / "models" / EXPORT_DIR)

    def row_conditions(self, exp: torch.Tensor, reference: torch.Tensor | None, i: int) -> dict[str, Any]:
        """Row ``i``'s expression."""
        return {"exp": exp[i:i + 1]}
