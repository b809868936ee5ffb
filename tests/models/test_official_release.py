"""Exports drop into the official release unchanged: its demo's loading calls, under the diffusers version its
requirements pin (0.29.2, installed in isolation by scripts/official_release_check.py), generate what current
diffusers generates from the same files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from blendexp.models.reference_adapter import ADAPTER_NAME, LORA_WEIGHT_NAME
from blendexp.modules.reference import ReferenceAdapterModule
from tests.conftest import REPO


def check(models: Path, tiny_base: tuple[Path, Path], env: Path, out: Path) -> subprocess.CompletedProcess:
    """scripts/official_release_check.py on an export's models/ folder, as a user runs it."""
    return subprocess.run([sys.executable, "scripts/official_release_check.py", "--models", str(models),
                           "--base-models", str(tiny_base[0]), "--sd15", str(tiny_base[1]), "--env", str(env),
                           "--out", str(out)], cwd=REPO, text=True, capture_output=True, timeout=900)


@pytest.mark.slow
def test_exports_run_in_the_official_demo_under_its_pinned_diffusers(tiny_base, tmp_path: Path) -> None:
    models, sd15 = tiny_base
    module = ReferenceAdapterModule(base={"models": str(models), "sd15": str(sd15)}, lora={"rank": 4, "alpha": 8},
                                    noise={}, dropout={}, optim={"lr": 1e-3})
    torch.manual_seed(0)
    for p in module.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.1)  # as training would
    module.export(tmp_path / "export")
    env = tmp_path / "official-pins"
    res = check(tmp_path / "export" / "models", tiny_base, env, tmp_path / "images.npz")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "diffusers 0.29.2 (official pin) vs current" in res.stdout
    images = np.load(tmp_path / "images.npz")
    assert np.abs(images["official_lora_1.0"] - images["official_lora_0.0"]).max() > 0.05  # the LoRA acts there
    # Negative control: the LoRA with alpha 8 at rank 4 kept in metadata instead of folded in (diffusers 0.29.2
    # ignores the metadata, so it runs at half strength): the script must see other images and fail.
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module.unet, adapter_name=ADAPTER_NAME))
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "export" / "models" / "ref_adapter"), unet_lora_layers=state, weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=module.unet.peft_config[ADAPTER_NAME].to_dict(), safe_serialization=True)
    res = check(tmp_path / "export" / "models", tiny_base, env, tmp_path / "unfolded.npz")
    assert res.returncode == 1 and "the official pin generates other images" in res.stderr, res.stderr[-3000:]
