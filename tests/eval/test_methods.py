"""The method registry: every accepted adapter form loads the same weights; bad method configs fail clearly; an
Expression Adapter at scale 0 is Arc2Face alone, and the scale reaches the one expr_ref carries; a method makes the
pipeline's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from blendexp.eval.methods import ExpressionAdapterMethod, FolderMethod, build_method
from blendexp.models.adapters import resolve_adapter
from blendexp.models.expression_adapter import (
    attach_expression_adapter,
    expression_adapter_state_dict,
    load_expression_adapter,
    save_expression_adapter,
)
from blendexp.pipeline import ExpressionPipeline

SCALES = {"exp": 1.0, "eyelid": 3.0, "jaw": 10.0}


@pytest.fixture(params=[None, SCALES], ids=["plain", "input_scale"])
def trained(request, tiny_base) -> tuple[UNet2DConditionModel, dict[str, float] | None]:
    """The tiny base UNet with a (random, MLP) adapter standing in for a trained one, trained plain or with
    per-group input scales (then its checkpoint holds the parametrised weight)."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(tiny_base[0], subfolder="arc2face")
    attach_expression_adapter(unet, num_tokens=2, projection="mlp", mult=2, input_scale=request.param)
    return unet, request.param


def _fresh(tiny_base) -> UNet2DConditionModel:
    """A plain base UNet to load adapters into."""
    return UNet2DConditionModel.from_pretrained(tiny_base[0], subfolder="arc2face")


def test_lightning_checkpoint_run_folder_and_export_load_the_same_adapter(tmp_path: Path, tiny_base,
                                                                          trained: tuple) -> None:
    trained_unet, input_scale = trained
    run = tmp_path / "run"
    save_expression_adapter(trained_unet, run / "export" / "models" / "exp_adapter")
    save_expression_adapter(trained_unet, tmp_path / "old_run" / "export")  # runs before the official layout
    weights = {n: p for n, p in trained_unet.named_parameters() if n.startswith("encoder_hid_proj") or "_ip." in n}
    ckpt = run / "checkpoints" / "last.ckpt"  # what DiffusionModule keeps: only the trained weights, "unet." prefix
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"unet.{n}": p.detach() for n, p in weights.items()}, "global_step": 7,
                "hyper_parameters": {"adapter": {"input_scale": input_scale}}}, ckpt)
    expected = expression_adapter_state_dict(trained_unet)
    for given in (run, run / "export", run / "export" / "models", run / "export" / "models" / "exp_adapter",
                  run / "export" / "models" / "exp_adapter" / "exp_adapter.bin", tmp_path / "old_run", ckpt):
        path = resolve_adapter(str(given), _fresh(tiny_base), tmp_path / "work", seed=0)
        unet = _fresh(tiny_base)
        load_expression_adapter(unet, path)
        got = expression_adapter_state_dict(unet)
        for part in expected:
            for key, value in expected[part].items():
                torch.testing.assert_close(got[part][key], value, msg=f"{given}: {part}.{key}")
    if input_scale:  # a scaled checkpoint without the scale it was trained with cannot be folded: say so
        bare = run / "checkpoints" / "bare.ckpt"
        torch.save({"state_dict": {f"unet.{n}": p.detach() for n, p in weights.items()}}, bare)
        with pytest.raises(ValueError, match="no adapter.input_scale"):
            resolve_adapter(str(bare), _fresh(tiny_base), tmp_path / "work2", seed=0)


def test_adapter_path_errors_name_the_path(tmp_path: Path, tiny_base) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        resolve_adapter(str(tmp_path / "nowhere"), _fresh(tiny_base), tmp_path, seed=0)
    foreign = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"unet.conv_in.weight": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="holds no Expression Adapter weights"):
        resolve_adapter(str(foreign), _fresh(tiny_base), tmp_path, seed=0)


def test_registry_builds_methods_and_rejects_bad_configs(tmp_path: Path) -> None:
    base = {"models": "m", "sd15": "s", "tiny_root": None}
    gen = {"steps": 4, "guidance": 3.0, "size": 64, "dtype": "float32"}
    method = build_method("mine", {"kind": "expr_adapter", "adapter": "x", "steps": 9}, base, gen)
    assert isinstance(method, ExpressionAdapterMethod)
    assert method.settings()["steps"] == 9 and method.settings()["adapter"] == "x"  # per-method override
    assert isinstance(build_method("other", {"kind": "folder", "path": str(tmp_path)}, base, gen), FolderMethod)
    with pytest.raises(ValueError, match="unknown kind 'nope'"):
        build_method("x", {"kind": "nope"}, base, gen)
    with pytest.raises(FileNotFoundError, match="eval.methods.other.path"):
        build_method("other", {"kind": "folder", "path": str(tmp_path / "missing")}, base, gen)


def test_expression_scale_zero_is_arc2face_alone(tmp_path: Path, tiny_base) -> None:
    base = {"models": str(tiny_base[0]), "sd15": str(tiny_base[1]), "tiny_root": None}
    gen = {"steps": 2, "guidance": 3.0, "size": 32, "dtype": "float32"}
    rng = np.random.default_rng(0)
    id_emb, exp = rng.normal(size=(2, 512)).astype(np.float32), rng.normal(size=(2, 55)).astype(np.float32)
    sources = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]

    def images(name: str, cfg: dict) -> np.ndarray:
        method = build_method(name, cfg, base, gen)
        method.load(tmp_path / name)
        return np.stack(method.generate(id_emb, exp, sources, seeds=[3, 4]))

    alone = images("arc2face", {"kind": "arc2face"})
    assert np.array_equal(images("off", {"kind": "expr_adapter", "adapter": None, "scale": 0.0}), alone)
    assert not np.array_equal(images("on", {"kind": "expr_adapter", "adapter": None, "scale": 1.0}), alone)
    # expr_ref carries the same (untrained, seeded) Expression Adapter: its scale must reach it too
    ref_off = images("ref_off", {"kind": "expr_ref", "ref_adapter": None, "scale": 0.0})
    ref_on = images("ref_on", {"kind": "expr_ref", "ref_adapter": None, "scale": 1.0})
    assert not np.array_equal(ref_on, ref_off)
    # a negative expression steers through the adapter only (nothing at scale 0), in both methods that carry it
    negative = {"negative_expression": "surprise"}
    assert np.array_equal(images("off_neg", {"kind": "expr_adapter", "adapter": None, "scale": 0.0, **negative}), alone)
    assert not np.array_equal(images("on_neg", {"kind": "expr_adapter", "adapter": None, "scale": 1.0, **negative}),
                              images("on", {"kind": "expr_adapter", "adapter": None, "scale": 1.0}))
    assert not np.array_equal(images("ref_neg", {"kind": "expr_ref", "ref_adapter": None, "scale": 1.0, **negative}),
                              ref_on)
    with pytest.raises(FileNotFoundError, match="FLAME file not found"):
        build_method("bad", {"kind": "expr_adapter", "negative_expression": str(tmp_path / "none.npy")}, base, gen)


def test_a_method_makes_the_pipelines_images(tmp_path: Path, tiny_base) -> None:
    """One generation path: the evaluation's expr_adapter and ``ExpressionPipeline`` attach the adapter the same way
    (diffusers' loader, one resolver), so the same adapter, identity, expression, seed and scale give the same image."""
    torch.manual_seed(1)
    unet = _fresh(tiny_base)
    attach_expression_adapter(unet, num_tokens=2, projection="mlp", mult=2)
    save_expression_adapter(unet, tmp_path / "mlp")
    rng = np.random.default_rng(0)
    id_emb = rng.normal(size=(1, 512)).astype(np.float32)
    id_emb /= np.linalg.norm(id_emb)
    exp = rng.normal(size=(1, 55)).astype(np.float32)
    base = {"models": str(tiny_base[0]), "sd15": str(tiny_base[1]), "tiny_root": None}
    method = build_method("mlp", {"kind": "expr_adapter", "adapter": str(tmp_path / "mlp"), "scale": 0.7}, base,
                          {"steps": 3, "guidance": 3.0, "size": 32, "dtype": "float32"})
    method.load(tmp_path / "work")
    image = method.generate(id_emb, exp, [np.zeros((32, 32, 3), np.uint8)], seeds=[3])[0]
    pipe = ExpressionPipeline.from_pretrained(*tiny_base, expression_adapter=str(tmp_path / "mlp"))
    same = pipe(id_emb[0], exp[0], seed=3, steps=3, guidance=3.0, size=32, expression_scale=0.7)[0]
    np.testing.assert_array_equal(image, same)
    other = pipe(id_emb[0], exp[0], seed=3, steps=3, guidance=3.0, size=32, expression_scale=0.0)[0]
    assert not np.array_equal(image, other)  # the comparison sees the adapter


def test_only_reference_mode_reads_the_source_photo(tmp_path: Path, tiny_base) -> None:
    """expr_ref generates from the source photo as its reference image; the other methods ignore the photo."""
    rng = np.random.default_rng(0)
    id_emb = rng.normal(size=(1, 512)).astype(np.float32)
    id_emb /= np.linalg.norm(id_emb)
    exp = rng.normal(size=(1, 55)).astype(np.float32)
    photos = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]
    base = {"models": str(tiny_base[0]), "sd15": str(tiny_base[1]), "tiny_root": None}
    gen = {"steps": 2, "guidance": 3.0, "size": 32, "dtype": "float32"}
    for kind, reads in (("expr_ref", True), ("expr_adapter", False)):
        method = build_method(kind, {"kind": kind}, base, gen)
        method.load(tmp_path / kind)
        first, second = (method.generate(id_emb, exp, [p], seeds=[0])[0] for p in photos)
        assert (not np.array_equal(first, second)) == reads, kind
