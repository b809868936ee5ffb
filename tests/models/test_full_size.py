"""Arc2Face at its real size: the random full-size base in the official layout, read by the real loaders; every
recipe's training step, the user's train → resume → export → plain-diffusers path and the memory model at reduced
real size (full channel widths, 128 px: benchmarks/real_size.py --quick); the projection a GPU run prints."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blendexp.memory_model import GIB, project, report
from blendexp.models.arc2face import Arc2FaceBase, id_prompt_embeds
from blendexp.models.full_size import PARAMETERS
from tests.conftest import REPO, run_cli


def stored_dtypes(file: Path) -> set[str]:
    """The tensor dtypes in a safetensors file's header."""
    with open(file, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """The user's command that writes the full-size base (about 2 GB), once for this module."""
    root = tmp_path_factory.mktemp("full_size")
    return run_cli("blendexp.models.full_size", str(root), timeout=1800), root


@pytest.fixture(scope="module")
def quick_benchmark(full_size: tuple[subprocess.CompletedProcess, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> dict:
    """benchmarks/real_size.py --quick on that base: its results JSON."""
    out = tmp_path_factory.mktemp("real_size") / "real_size.json"
    res = subprocess.run([sys.executable, "benchmarks/real_size.py", "--quick", "--root", str(full_size[1]),
                          "--out", str(out)], cwd=REPO, text=True, capture_output=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| expr_adapter | 128 | False |" in res.stdout
    return {"path": out, **json.loads(out.read_text())}


@pytest.mark.slow
def test_full_size_base_has_the_published_sizes_and_loads_like_real_weights(full_size) -> None:
    res, root = full_size
    assert res.returncode == 0, res.stderr[-3000:]
    models, sd15 = root / "models", root / "stable-diffusion-v1-5"
    assert f"models={models}" in res.stdout
    for weights in (models / "arc2face" / "diffusion_pytorch_model.safetensors", models / "encoder" / "model.safetensors",
                    sd15 / "vae" / "diffusion_pytorch_model.safetensors"):
        assert stored_dtypes(weights) == {"F16"}, weights  # as the official release stores them
    assert (sd15 / "scheduler" / "scheduler_config.json").is_file() and (sd15 / "tokenizer" / "vocab.json").is_file()
    base = Arc2FaceBase.from_pretrained(str(models), str(sd15))
    sizes = {"unet": base.unet, "text_encoder": base.text_encoder, "vae": base.vae}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in sizes.items()} == PARAMETERS
    # the 512-d ArcFace embedding is zero-padded into CLIP ViT-L's 768-d token (the tiny base is 512 wide)
    prompt = id_prompt_embeds(base.text_encoder, base.tokenizer, F.normalize(torch.randn(1, 512)))
    assert prompt.shape == (1, 77, 768) and torch.isfinite(prompt).all()


@pytest.mark.slow  # about 10 minutes: a full-size UNet step takes ~30 s on 2 cores even at 128 px
def test_every_recipe_steps_at_real_size_and_the_export_runs_in_plain_diffusers(quick_benchmark: dict) -> None:
    user = quick_benchmark["user_path"]["expr_adapter/128"]  # train a step, resume, export, load, generate
    assert user["exported"] == ["models/exp_adapter/exp_adapter.bin", "models/exp_adapter/exp_adapter.safetensors"]
    assert user["finite"] and user["generated"] == ["lora_None"] and user["checkpoint_bytes"] > 0
    measured = quick_benchmark["measured"]
    assert sorted(measured) == [f"{r}/128/checkpointing=False" for r in ("arc2face_base", "expr_adapter",
                                                                         "ref_adapter")]
    total = sum(PARAMETERS.values())
    for key, m in measured.items():
        assert "error" not in m, (key, m.get("error"))
        assert m["trained_parameters"] + m["frozen_parameters"] >= total, key  # the base plus what the recipe adds
        bf16, fp32 = m["model"]["bf16"], m["model"]["fp32"]
        assert 0 < bf16["per_sample_bytes"] <= fp32["per_sample_bytes"] and bf16["fixed_bytes"] > 0, key
        fits = [bf16["largest_batch"][c] for c in ("24", "40", "80")]
        assert 0 < fits[0] < fits[1] < fits[2], (key, fits)  # activations grow with the batch
        assert m["seconds_per_step_fp32"] > 0 and m["peak_rss_bytes"] > 2 * GIB, key
    base = measured["arc2face_base/128/checkpointing=False"]
    assert base["trained_parameters"] == PARAMETERS["unet"]  # the whole UNet; text encoder frozen by default
    # weights, gradients and AdamW state of 860M trained parameters: at least 16 bytes each
    assert base["model"]["fp32"]["fixed_bytes"] > 16 * PARAMETERS["unet"]
    for adapter in ("expr_adapter", "ref_adapter"):
        assert 0 < measured[f"{adapter}/128/checkpointing=False"]["trained_parameters"] < PARAMETERS["unet"] / 10


@pytest.mark.slow
def test_gpu_run_at_real_size_prints_the_projection_before_it_starts(full_size, quick_benchmark: dict) -> None:
    _, root = full_size
    res = run_cli("blendexp.train", "+experiment=expr_adapter", "trainer=gpu", f"paths.models={root / 'models'}",
                  f"paths.sd15={root / 'stable-diffusion-v1-5'}", "data.image_size=128", "data.batch_size=4096",
                  f"memory_model={quick_benchmark['path']}", "data.num_workers=0", timeout=900)
    assert res.returncode != 0  # this machine has no GPU: Lightning refuses after the projection was printed
    fit = quick_benchmark["measured"]["expr_adapter/128/checkpointing=False"]["model"]["bf16"]
    want = project(fit, 4096) / GIB
    assert (f"memory model (benchmarks/real_size.py, a projection, measured at 128 px): expr_adapter at 128 px, "
            f"batch 4096, gradient checkpointing False: about {want:.1f} GiB") in res.stdout + res.stderr


def test_projection_warns_when_the_batch_will_not_fit_the_gpu(tmp_path: Path) -> None:
    fit = {"fixed_bytes": 4 * GIB, "per_sample_bytes": GIB // 2, "floor_bytes": 5 * GIB}
    results = tmp_path / "real_size.json"
    results.write_text(json.dumps({"measured": {"expr_adapter/512/checkpointing=False": {"model": {
        "bf16": fit, "fp32": {"fixed_bytes": 8 * GIB, "per_sample_bytes": GIB, "floor_bytes": 9 * GIB}}}}}))
    line = report("expr_adapter", 512, False, 48, "bf16-mixed", results, capacity=24 * GIB)
    assert "about 28.0 GiB of GPU memory in bf16 mixed precision" in line
    assert "the largest batch that fits is about 40. data.batch_size=48 will not fit" in line
    assert "will not fit" not in report("expr_adapter", 512, False, 40, "bf16-mixed", results, capacity=24 * GIB)
    # activations scale with pixels from the nearest measured size; float32 runs read the float32 fit
    assert "about 5.0 GiB" in report("expr_adapter", 256, False, 8, "bf16-mixed", results, capacity=None)
    assert "about 16.0 GiB of GPU memory in float32" in report("expr_adapter", 512, False, 8, "32", results, None)
    # the optimizer step's peak does not grow with the batch: small batches meet that floor
    assert "about 5.0 GiB" in report("expr_adapter", 512, False, 1, "bf16-mixed", results, capacity=None)
    assert report("arc2face_base", 512, False, 8, "bf16-mixed", results, None) is None  # not measured: silent
    with pytest.raises(FileNotFoundError, match="memory_model=.*nope.json: no such file"):
        report("expr_adapter", 512, False, 8, "bf16-mixed", tmp_path / "nope.json", None)
