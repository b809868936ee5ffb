"""A randomly initialised Arc2Face at its real size, in the official layout: every real shape without a download.

SD 1.5's UNet and VAE and CLIP ViT-L/14's text encoder are built from their published configuration values and
written as ``<root>/models/{arc2face,encoder}`` and ``<root>/stable-diffusion-v1-5/{vae,tokenizer,scheduler}``, in
float16 as the official weights are, so the loaders real weights go through read them. The tokenizer is the tiny
base's small BPE vocabulary (the real one is data, not configuration); its ids fit CLIP's 49408-token table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from blendexp.models.tiny import base_cli, save_base, save_tiny_tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from blendexp.models.arc2face import Arc2FaceTextEncoder

log = logging.getLogger(__name__)

# stable-diffusion-v1-5 unet/config.json (859,520,964 parameters)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
                 act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1)
# stable-diffusion-v1-5 vae/config.json (83,653,863 parameters)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215, act_fn="silu")
# openai/clip-vit-large-patch14's text_config, as SD 1.5's text_encoder/config.json (123,060,480 parameters)
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                     layer_norm_eps=1e-5, projection_dim=768)
PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}  # the published models'


def full_size_models(bos_id: int, eos_id: int) -> tuple[UNet2DConditionModel, Arc2FaceTextEncoder, AutoencoderKL]:
    """UNet, text encoder and VAE at SD 1.5's / CLIP ViT-L/14's sizes, randomly initialised."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from blendexp.models.arc2face import Arc2FaceTextEncoder

    text = CLIPTextConfig(**CLIP_L14_TEXT, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return UNet2DConditionModel(**SD15_UNET), Arc2FaceTextEncoder(text), AutoencoderKL(**SD15_VAE)


def save_full_size_base(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a random full-size base (float16) in the official layout; returns (models dir, SD 1.5 dir)."""
    import torch

    root = Path(root)
    torch.manual_seed(seed)
    tok = save_tiny_tokenizer(root / "stable-diffusion-v1-5" / "tokenizer")
    unet, encoder, vae = (m.to(torch.float16) for m in full_size_models(tok.bos_token_id, tok.eos_token_id))
    models, sd15 = save_base(root, unet, encoder, vae, sd15_weights=False)
    log.info("full-size random Arc2Face base written to %s and %s", models, sd15)
    return models, sd15


def main() -> None:
    """CLI: ``python -m blendexp.models.full_size <dir>`` (about 2 GB) for real-size runs without the weights."""
    base_cli(__doc__.splitlines()[0], save_full_size_base)


if __name__ == "__main__":
    main()
