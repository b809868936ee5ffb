"""Training the Arc2Face base itself: the UNet (and optionally the CLIP encoder) learns to draw the identity
written at the ``id`` token. The official release has no training code; this recipe trains the toy base and
fine-tunes the real one (``+experiment=arc2face_base``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from blendexp.modules.diffusion import DiffusionModule


class Arc2FaceBaseModule(DiffusionModule):
    """Noise-prediction training of the UNet conditioned on ID prompt embeddings, with ID dropout for CFG."""

    trains_whole_unet = True

    def __init__(self, base: dict[str, Any], noise: dict[str, Any], dropout: dict[str, float],
                 optim: dict[str, Any], train_text_encoder: bool = False, gradient_checkpointing: bool = False) -> None:
        super().__init__(base=base, noise=noise, dropout=dropout, optim=optim,
                         gradient_checkpointing=gradient_checkpointing)
        self.save_hyperparameters()
        self.unet.requires_grad_(True)
        self.text_encoder.requires_grad_(train_text_encoder)

    def forward_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Diffusion loss of (image, id); dropped identities see the empty prompt."""
        latents = self.encode_latents(batch)
        encoder_states = self.id_embeds(batch["id"].to(self.dtype), self.drop_mask("id", latents.shape[0]))
        return self.diffusion_loss(latents, lambda noisy, t: self.unet(noisy, t, encoder_states).sample)

    def export(self, folder: str | Path) -> list[Path]:
        """Write a complete base in the official layout: ``models/{arc2face,encoder}`` + SD 1.5 parts."""
        folder = Path(folder)
        models, sd15 = folder / "models", folder / "stable-diffusion-v1-5"
        self.unet.save_pretrained(models / "arc2face")
        self.text_encoder.save_pretrained(models / "encoder")
        self.vae.save_pretrained(sd15 / "vae")
        self.noise_scheduler.save_pretrained(sd15 / "scheduler")
        src = Path(self.hparams.base["sd15"])
        if (src / "tokenizer").is_dir():  # untrained: copied as is, in SD 1.5's vocab.json/merges.txt form
            shutil.copytree(src / "tokenizer", sd15 / "tokenizer", dirs_exist_ok=True)
        else:  # a hub id
            self.tokenizer.save_pretrained(sd15 / "tokenizer")
        if (src / "model_index.json").is_file():
            shutil.copy(src / "model_index.json", sd15 / "model_index.json")
        return [models, sd15]
