"""What every Arc2Face training recipe shares: the frozen base, the noising objective, condition dropout,
optimiser schedule, gradient-norm logging, NaN guard and slim checkpoints that keep only trained weights."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

from blendexp.models.arc2face import Arc2FaceBase, empty_prompt_embeds, id_prompt_embeds
from blendexp.models.sampling import sample
from blendexp.models.tiny import ensure_tiny_base

log = logging.getLogger(__name__)


def load_base(models: str, sd15: str, tiny_root: str | None = None) -> Arc2FaceBase:
    """Load the base; with ``tiny_root`` set, first write the tiny random base there (embedded default)."""
    if tiny_root:
        models, sd15 = map(str, ensure_tiny_base(tiny_root))
    return Arc2FaceBase.from_pretrained(models, sd15)


class DiffusionModule(L.LightningModule):
    """Frozen Arc2Face base plus whatever a subclass marks trainable; subclasses add their conditions."""

    trains_whole_unet = False  # only base training may choose what the UNet predicts

    def __init__(self, base: dict[str, Any], noise: dict[str, Any], dropout: dict[str, float],
                 optim: dict[str, Any], gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.strict_loading = False  # checkpoints hold only the trained weights
        b = load_base(**base)
        self.unet, self.vae, self.text_encoder = b.unet, b.vae, b.text_encoder
        self.tokenizer, self.noise_scheduler = b.tokenizer, b.scheduler
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        if gradient_checkpointing:  # recompute the UNet's activations in the backward pass: memory for time
            self.unet.enable_gradient_checkpointing()
        self.noise_cfg, self.dropout_cfg, self.optim_cfg = dict(noise), dict(dropout), dict(optim)
        self._set_prediction_type(self.noise_cfg.get("prediction_type"))
        with torch.no_grad():
            self.register_buffer("empty_embeds", empty_prompt_embeds(self.text_encoder, self.tokenizer), persistent=False)
        self.skipped_total = 0

    def _set_prediction_type(self, wanted: str | None) -> None:
        """The base's scheduler says what its UNet predicts; adapters must follow it, base training may set it."""
        current = self.noise_scheduler.config.get("prediction_type", "epsilon")
        if wanted is None or wanted == current:
            return
        if not self.trains_whole_unet:
            raise ValueError(f"model.noise.prediction_type={wanted} but this base's UNet predicts {current} (its "
                             f"scheduler config); an adapter trains against the frozen base's parameterisation: "
                             f"set model.noise.prediction_type=null or {current}")
        self.noise_scheduler.register_to_config(prediction_type=wanted)  # exported with the trained base

    def base(self) -> Arc2FaceBase:
        """The (adapted) components as one object, e.g. to build a diffusers pipeline for samples."""
        return Arc2FaceBase(self.unet, self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler)

    @torch.no_grad()
    def sample_images(self, id_emb: torch.Tensor, exp: torch.Tensor, seeds: list[int], steps: int = 20,
                      guidance: float = 3.0, size: int = 64, reference: torch.Tensor | None = None) -> list[np.ndarray]:
        """One image (H, W, 3) uint8 per (identity, expression[, reference (3, H, W) in [-1, 1]]) row, from a plain
        diffusers pipeline with DPM-Solver on the module's current weights (the sample grids)."""
        pipe = self.base().pipeline(DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        was_training = self.training
        self.eval()
        prompts = self.id_embeds(id_emb.to(self.device, self.dtype))
        exp, common = exp.to(self.device, self.dtype), dict(steps=steps, guidance=guidance, size=size)
        if self.row_conditions(exp, reference, 0):  # diffusers hands a call's expression and reference to all rows
            images = np.concatenate([sample(pipe, prompts[i:i + 1], [seed], **self.row_conditions(exp, reference, i),
                                            **common) for i, seed in enumerate(seeds)])
        else:
            images = sample(pipe, prompts, seeds, **common)
        self.train(was_training)
        return list(images)

    def row_conditions(self, exp: torch.Tensor, reference: torch.Tensor | None, i: int) -> dict[str, Any]:
        """What sample row ``i`` is conditioned on besides its identity; a base has nothing more (one call for all)."""
        return {}

    def trainable_names(self) -> set[str]:
        """Names of the parameters this recipe trains (the only ones a checkpoint keeps)."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def encode_latents(self, batch: dict[str, Any], prefix: str = "") -> torch.Tensor:
        """Cached latents when the shards carry them, else VAE-encoded pixels, scaled for the UNet.

        ``prefix`` selects another image of the batch, e.g. ``ref_`` for a pair's reference frame."""
        if f"{prefix}latents" in batch:
            return batch[f"{prefix}latents"].to(self.dtype)
        dist = self.vae.encode(batch[f"{prefix}pixel_values"].to(self.dtype)).latent_dist
        return dist.sample() * self.vae.config.scaling_factor

    def id_embeds(self, id_emb: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Arc2Face prompt embeddings (B, 77, D); rows in ``drop`` get the empty prompt (CFG's unconditional).

        Gradients flow only when the text encoder itself is being trained (base training).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder_trainable()):
            embeds = id_prompt_embeds(self.text_encoder, self.tokenizer, id_emb)
            if drop is not None and drop.any():
                empty = empty_prompt_embeds(self.text_encoder, self.tokenizer) if self.text_encoder_trainable() \
                    else self.empty_embeds
                embeds = torch.where(drop[:, None, None], empty.to(embeds.dtype), embeds)
        return embeds

    def text_encoder_trainable(self) -> bool:
        """Whether this recipe trains the text encoder (then its outputs cannot be cached or detached)."""
        return any(p.requires_grad for p in self.text_encoder.parameters())

    def drop_mask(self, key: str, n: int) -> torch.Tensor:
        """Rows whose condition ``key`` is dropped this step (classifier-free guidance training)."""
        p = float(self.dropout_cfg.get(key, 0.0)) if self.training else 0.0
        return torch.rand(n, device=self.device) < p

    def diffusion_loss(self, latents: torch.Tensor, predict: Any) -> torch.Tensor:
        """Noise the latents, call ``predict(noisy, t)`` and return the (optionally min-SNR weighted) MSE."""
        noise = torch.randn_like(latents)
        sched = self.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        noisy = sched.add_noise(latents, noise, t)
        pred_type = sched.config.prediction_type
        target = noise if pred_type == "epsilon" else sched.get_velocity(latents, noise, t)
        pred = predict(noisy, t)
        gamma = self.noise_cfg.get("snr_gamma")
        if not gamma:
            return F.mse_loss(pred.float(), target.float())
        snr = compute_snr(sched, t)
        weight = torch.clamp(snr, max=gamma) / (snr + 1 if pred_type == "v_prediction" else snr)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean()

    def forward_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The recipe's loss for one batch; subclasses define their conditions here."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_loss(batch)")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """One optimisation step's loss, logged (and checked for NaN) the same way for every recipe."""
        loss = self.forward_loss(batch)
        self.log_step(loss, batch)
        return loss

    def log_step(self, loss: torch.Tensor, batch: dict[str, Any]) -> None:
        """Log loss and skipped-sample count; stop with a clear message on a non-finite loss."""
        if not torch.isfinite(loss):
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}; training stopped. Last good checkpoint: {last}. "
                f"Lower model.optim.lr or check the data for NaNs, then resume with ckpt_path=<that checkpoint>.")
        self.skipped_total += int(batch.get("skipped", torch.zeros(1)).sum())
        self.log("train/loss", loss, prog_bar=True)
        self.log("data/skipped", float(self.skipped_total), reduce_fx="sum", sync_dist=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the global gradient norm of the trained weights."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trained weights with a warm-up learning-rate schedule stepped every batch."""
        cfg = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.01),
                                betas=tuple(cfg.get("betas", (0.9, 0.999))))
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10**9
        sched = get_scheduler(cfg.get("schedule", "constant_with_warmup"), opt,
                              num_warmup_steps=cfg.get("warmup_steps", 0), num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained weights: the frozen base is reloaded from its folder, not duplicated per save."""
        keep = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["blendexp/skipped_total"] = self.skipped_total

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the running skipped-sample count so resumed logs continue it."""
        self.skipped_total = int(checkpoint.get("blendexp/skipped_total", 0))

