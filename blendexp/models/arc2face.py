"""Arc2Face base: a CLIP text encoder fed with token embeddings, the ID→prompt projection and base loading.

Arc2Face is Stable Diffusion 1.5 whose text encoder sees the prompt ``photo of a id person`` with the
embedding of the token ``id`` replaced by the 512-d L2-normalised ArcFace embedding, zero-padded to the
encoder width. The official release keeps the UNet in ``<models>/arc2face`` and the encoder in
``<models>/encoder``; VAE, tokenizer and scheduler come from an SD 1.5 folder or hub id.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling

from blendexp.flame import ID_DIM

log = logging.getLogger(__name__)

ID_PROMPT = "photo of a id person"
ID_TOKEN = "id"
OFFICIAL_HUB_ID = "FoivosPar/Arc2Face"
SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
WEIGHT_NAMES = {
    "arc2face": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "encoder": ("model.safetensors", "pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
}
EXPECTED_LAYOUT = """expected layout:
  <models>/arc2face/{config.json, diffusion_pytorch_model.safetensors}     (Arc2Face UNet)
  <models>/encoder/{config.json, model.safetensors}                        (Arc2Face CLIP text encoder)
  <sd15>/vae/{config.json, diffusion_pytorch_model.safetensors}
  <sd15>/tokenizer/{vocab.json, merges.txt}
  <sd15>/scheduler/scheduler_config.json
(<models> may be the hub id FoivosPar/Arc2Face and <sd15> stable-diffusion-v1-5/stable-diffusion-v1-5 when online;
 `python -m blendexp.models.tiny <dir>` writes a tiny random base in this layout)"""


class Arc2FaceTextEncoder(CLIPTextModel):
    """CLIP text model that also accepts precomputed token embeddings, so the ID can replace a token."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        input_token_embs: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Plain CLIP forward, or (with ``input_token_embs`` (B, L, D)) the same transformer on given embeddings."""
        if input_token_embs is None:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        hidden = self.embeddings(position_ids=position_ids, inputs_embeds=input_token_embs)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None)
        out = self.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True)
        last = self.final_layer_norm(out.last_hidden_state)
        eos = (input_ids == self.eos_token_id).int().argmax(-1) if input_ids is not None else torch.full(
            (last.shape[0],), last.shape[1] - 1, device=last.device
        )
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[torch.arange(last.shape[0]), eos])


# Official checkpoints keep CLIP's ``text_model.`` key prefix; transformers maps it for ``CLIPTextModel`` by class
# name only, so the subclass registers the same mapping (used when loading and, reversed, when saving).
register_checkpoint_conversion_mapping("Arc2FaceTextEncoder", [PrefixChange(prefix_to_remove="text_model")])


def id_prompt_ids(tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, int]:
    """Token ids of the ID prompt (1, 77) and the position of the ``id`` token in it."""
    ids = tokenizer(ID_PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    id_token = tokenizer.encode(ID_TOKEN, add_special_tokens=False)
    if len(id_token) != 1:
        raise ValueError(f"tokenizer splits {ID_TOKEN!r} into {len(id_token)} tokens; Arc2Face needs a single token")
    pos = (ids[0] == id_token[0]).nonzero()
    return ids, int(pos[0, 0])


def id_prompt_embeds(text_encoder: Arc2FaceTextEncoder, tokenizer: CLIPTokenizer, id_emb: torch.Tensor) -> torch.Tensor:
    """Encode ArcFace embeddings (B, 512) into Arc2Face prompt embeddings (B, 77, D) via the ``id`` token."""
    width = text_encoder.config.hidden_size
    if id_emb.shape[-1] != ID_DIM or width < ID_DIM:
        raise ValueError(f"identity embeddings must be (B, {ID_DIM}) and the encoder at least {ID_DIM} wide; "
                         f"got {tuple(id_emb.shape)} and width {width}")
    ids, pos = id_prompt_ids(tokenizer)
    ids = ids.to(id_emb.device).expand(id_emb.shape[0], -1)
    embs = text_encoder.get_input_embeddings()(ids).clone()
    id_emb = F.normalize(id_emb.float(), dim=-1)
    embs[:, pos] = F.pad(id_emb, (0, width - ID_DIM)).to(embs.dtype)
    return text_encoder(input_ids=ids, input_token_embs=embs).last_hidden_state


def empty_prompt_embeds(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> torch.Tensor:
    """Embeddings of the empty prompt (1, 77, D): the unconditional ID input, as the pipeline's CFG uses."""
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return text_encoder(input_ids=ids.to(text_encoder.device)).last_hidden_state


def _is_local(path: str) -> bool:
    """A path that exists or looks like a filesystem path is treated as local, anything else as a hub id."""
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def check_layout(models: str, sd15: str) -> None:
    """Raise one error naming every missing file of a local base, with the expected layout."""
    missing: list[str] = []
    checks = [(models, "arc2face"), (models, "encoder"), (sd15, "vae")]
    for root, sub in checks:
        if not _is_local(root):
            continue
        folder = Path(root) / sub
        if not (folder / "config.json").is_file():
            missing.append(str(folder / "config.json"))
        if not any((folder / w).is_file() for w in WEIGHT_NAMES[sub]):
            missing.append(str(folder / WEIGHT_NAMES[sub][0]))
    if _is_local(sd15):
        missing += [str(Path(sd15) / "tokenizer" / f) for f in ("vocab.json", "merges.txt")
                    if not (Path(sd15) / "tokenizer" / f).is_file()]
        if not (Path(sd15) / "scheduler" / "scheduler_config.json").is_file():
            missing.append(str(Path(sd15) / "scheduler" / "scheduler_config.json"))
    if missing:
        raise FileNotFoundError(f"Arc2Face base incomplete: missing {', '.join(missing)}\n{EXPECTED_LAYOUT}")


@dataclass
class Arc2FaceBase:
    """The frozen parts every adapter trains against."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: Arc2FaceTextEncoder
    tokenizer: CLIPTokenizer
    scheduler: SchedulerMixin

    @classmethod
    def from_pretrained(cls, models: str, sd15: str, dtype: torch.dtype = torch.float32) -> "Arc2FaceBase":
        """Load from the official layout (local folders or hub ids); the training scheduler is DDPM."""
        models, sd15 = str(models), str(sd15)
        check_layout(models, sd15)
        log.info("loading Arc2Face base from %s (SD 1.5 parts from %s)", models, sd15)
        return cls(
            unet=UNet2DConditionModel.from_pretrained(models, subfolder="arc2face", torch_dtype=dtype),
            vae=AutoencoderKL.from_pretrained(sd15, subfolder="vae", torch_dtype=dtype),
            text_encoder=Arc2FaceTextEncoder.from_pretrained(models, subfolder="encoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(sd15, subfolder="tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(sd15, subfolder="scheduler"),
        )

    def pipeline(self, scheduler: SchedulerMixin | None = None) -> StableDiffusionPipeline:
        """A plain diffusers pipeline over these components (adapters stay attached to the UNet)."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
