"""Arc2Face base: ID-token projection and loading the official layout (on the tiny base)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from blendexp.models.arc2face import Arc2FaceBase, _is_local, id_prompt_embeds, id_prompt_ids
from tests.conftest import REPO


@pytest.fixture(scope="module")
def base(tiny_base: tuple[Path, Path]) -> Arc2FaceBase:
    return Arc2FaceBase.from_pretrained(*tiny_base)


def test_tiny_layout_matches_official(tiny_base: tuple[Path, Path]) -> None:
    models, sd15 = tiny_base
    for f in ("arc2face/config.json", "arc2face/diffusion_pytorch_model.safetensors", "encoder/config.json",
              "encoder/model.safetensors"):
        assert (models / f).is_file(), f
    for f in ("vae/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
              "model_index.json"):
        assert (sd15 / f).is_file(), f
    with safe_open(models / "encoder" / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # transformers-4 era keys, as released


@pytest.mark.parametrize("which", ["tiny", "shipped toy"])
def test_pipeline_without_scheduler_config_dump(which: str, tiny_base: tuple[Path, Path]) -> None:
    """SD 1.5's scheduler config sets clip_sample false; without it every pipeline warns with the whole config."""
    models, sd15 = tiny_base if which == "tiny" else (REPO / "data/toy/models", REPO / "data/toy/stable-diffusion-v1-5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Arc2FaceBase.from_pretrained(models, sd15).pipeline()
    assert [str(w.message)[:200] for w in caught if "clip_sample" in str(w.message)] == []


def test_prompt_tokenises_to_single_id_token(base: Arc2FaceBase) -> None:
    assert base.tokenizer.tokenize("photo of a id person") == ["photo</w>", "of</w>", "a</w>", "id</w>", "person</w>"]
    ids, pos = id_prompt_ids(base.tokenizer)
    assert ids.shape == (1, 77) and pos == 4  # <bos> photo of a [id]


def test_id_embedding_written_at_id_token(base: Arc2FaceBase) -> None:
    enc, tok = base.text_encoder, base.tokenizer
    captured = {}

    def grab(module, args, kwargs, out):
        captured["embs"] = kwargs["inputs_embeds"].detach()

    h = enc.embeddings.register_forward_hook(grab, with_kwargs=True)
    id_emb = torch.randn(2, 512) * 3
    out = id_prompt_embeds(enc, tok, id_emb)
    h.remove()
    _, pos = id_prompt_ids(tok)
    assert out.shape == (2, 77, enc.config.hidden_size)
    torch.testing.assert_close(captured["embs"][:, pos, :512], F.normalize(id_emb, dim=-1))
    other = id_prompt_embeds(enc, tok, torch.randn(2, 512))
    assert not torch.allclose(out, other)
    torch.testing.assert_close(out, id_prompt_embeds(enc, tok, id_emb))


def test_wrong_id_size_is_rejected(base: Arc2FaceBase) -> None:
    with pytest.raises(ValueError, match="512"):
        id_prompt_embeds(base.text_encoder, base.tokenizer, torch.randn(1, 128))


def test_incomplete_folder_names_missing_file(tiny_base: tuple[Path, Path], tmp_path: Path) -> None:
    models, sd15 = tiny_base
    broken = tmp_path / "models"
    shutil.copytree(models, broken)
    (broken / "encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder/model.safetensors[\s\S]*expected layout"):
        Arc2FaceBase.from_pretrained(broken, sd15)


def test_hub_ids_are_not_checked_locally() -> None:
    assert not _is_local("FoivosPar/Arc2Face")
    assert _is_local("/abs/models") and _is_local("./models") and _is_local("models")
