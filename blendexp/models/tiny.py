"""Tiny random Arc2Face bases written in exactly the official layout, so tests and the embedded default
exercise the real loaders without downloading anything.

Writes ``<root>/models/{arc2face,encoder}`` and ``<root>/stable-diffusion-v1-5/{vae,tokenizer,scheduler,
text_encoder,unet,model_index.json}``. The tokenizer is a real ``CLIPTokenizer`` over a small byte-level BPE
vocabulary that contains the ID prompt's words.
"""

from __future__ import annotations

import argparse
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from blendexp.flame import ID_DIM

if TYPE_CHECKING:  # torch, diffusers and transformers load in the functions: the CLI's --help needs none of them
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from blendexp.models.arc2face import Arc2FaceTextEncoder

log = logging.getLogger(__name__)

TEXT_WIDTH = ID_DIM  # the ID must fit into a token embedding
SPECIAL = ("<|startoftext|>", "<|endoftext|>")
WORDS = ("photo", "of", "a", "id", "person", "face", "smile", "neutral")  # the words of arc2face.ID_PROMPT and a few
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


@lru_cache(maxsize=1)
def _byte_chars() -> list[str]:
    """CLIP's reversible byte→unicode table (printable bytes map to themselves, the rest to U+0100…)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_bpe(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A BPE vocabulary and merge list in which each of ``words`` is a single token."""
    base = _byte_chars()
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab_list:
                vocab_list.append(parts[0])
    vocab_list += list(SPECIAL)
    return {tok: i for i, tok in enumerate(vocab_list)}, list(dict.fromkeys(merges))


def save_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt and the tokenizer config, and return the tokenizer loaded back."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                        model_max_length=77)
    tok.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def tiny_text_encoder(vocab_size: int, eos_id: int, bos_id: int) -> Arc2FaceTextEncoder:
    """One-layer CLIP text encoder as wide as the identity embedding."""
    from transformers import CLIPTextConfig

    from blendexp.models.arc2face import Arc2FaceTextEncoder

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                         eos_token_id=eos_id, bos_token_id=bos_id, pad_token_id=eos_id)
    return Arc2FaceTextEncoder(cfg)


def tiny_unet(sample_size: int = 8, latent_channels: int = 4) -> UNet2DConditionModel:
    """Two-level cross-attention UNet with SD 1.5's block types, small enough for CPU training."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_vae(latent_channels: int = 4, widths: tuple[int, ...] = (8, 16, 16, 16)) -> AutoencoderKL:
    """AutoencoderKL with SD's 8× downsampling (4 blocks; SD 1.5's 4 latent channels by default), ``widths`` wide:
    a few thousand parameters by default."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1, norm_num_groups=8,
        block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths), sample_size=64,
    )


def _use_official_clip_keys(path: Path) -> None:
    """Rewrite CLIP weights with the ``text_model.`` prefix that the official (transformers 4) files carry."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}, path,
              metadata={"format": "pt"})


def save_base(root: Path, unet: UNet2DConditionModel, encoder: Arc2FaceTextEncoder, vae: AutoencoderKL,
              sd15_weights: bool = True) -> tuple[Path, Path]:
    """Write a base's models in the official layout with SD 1.5's scheduler and ``model_index.json`` (the tokenizer
    is already in ``stable-diffusion-v1-5/tokenizer``); ``sd15_weights`` also writes SD 1.5's own unet and text
    encoder folders (the tiny base's copies; a full-size base skips the second 1.7 GB)."""
    from diffusers import PNDMScheduler

    models, sd15 = root / "models", root / "stable-diffusion-v1-5"
    copies = ((unet, sd15 / "unet"), (encoder, sd15 / "text_encoder")) if sd15_weights else ()
    for model, folder in ((unet, models / "arc2face"), (encoder, models / "encoder"), (vae, sd15 / "vae"), *copies):
        model.save_pretrained(folder)
    for folder in (models / "encoder", *([sd15 / "text_encoder"] if sd15_weights else [])):
        _use_official_clip_keys(folder / "model.safetensors")
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    # As in SD 1.5's scheduler_config.json: the DDPM scheduler loaded from it then has no clip_sample, about which
    # every StableDiffusionPipeline would print a deprecation message with the whole config.
    scheduler.register_to_config(clip_sample=False)
    scheduler.save_pretrained(sd15 / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
             "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (sd15 / "model_index.json").write_text(json.dumps(index, indent=2))
    return models, sd15


def save_tiny_base(root: str | Path, seed: int = 0, latent_channels: int = 4) -> tuple[Path, Path]:
    """Create and save a tiny random base (VAE and UNet with ``latent_channels``); returns (models dir, SD 1.5 dir)."""
    import torch

    root = Path(root)
    torch.manual_seed(seed)
    tok = save_tiny_tokenizer(root / "stable-diffusion-v1-5" / "tokenizer")
    encoder = tiny_text_encoder(len(tok.get_vocab()), tok.eos_token_id, tok.bos_token_id)
    models, sd15 = save_base(root, tiny_unet(latent_channels=latent_channels), encoder, tiny_vae(latent_channels))
    log.info("tiny Arc2Face base written to %s and %s", models, sd15)
    return models, sd15


def ensure_tiny_base(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny base once; later calls reuse it (the marker is written last, so a killed write redoes it)."""
    root = Path(root)
    marker = root / ".complete"
    if not marker.exists():
        save_tiny_base(root, seed)
        marker.write_text(str(seed))
    return root / "models", root / "stable-diffusion-v1-5"


def base_cli(description: str, save: Callable[[Path, int], tuple[Path, Path]]) -> None:
    """The command line of a base writer: ``<dir> [--seed N]``, then where its two folders are."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    models, sd15 = save(args.root, args.seed)
    print(f"models={models}\nsd15={sd15}")


def main() -> None:
    """CLI: ``python -m blendexp.models.tiny <dir>`` writes a tiny base for experiments and bug reports."""
    base_cli(__doc__.splitlines()[0], save_tiny_base)


if __name__ == "__main__":
    main()
