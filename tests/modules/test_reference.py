"""The Reference Adapter recipe: overfitting one pair through Lightning, dropout, checkpoints, export, grids, CLI."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from blendexp.callbacks import SampleGrid
from blendexp.models.arc2face import Arc2FaceBase
from blendexp.models.expression_adapter import adapter_parameters, attach_expression_adapter, save_expression_adapter
from blendexp.models.reference_adapter import reference_lora_parameters
from blendexp.modules.reference import ReferenceAdapterModule
from tests.conftest import missed_thresholds, run_cli


def make_module(tiny_base, dropout: dict[str, float] | None = None, **kw) -> ReferenceAdapterModule:
    models, sd15 = tiny_base
    return ReferenceAdapterModule(base={"models": str(models), "sd15": str(sd15)},
                                  lora={"rank": 4, "alpha": 4}, noise={"prediction_type": "epsilon"},
                                  dropout=dropout or {}, optim={"lr": 3e-3, "warmup_steps": 0}, **kw)


def pair_batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """One (reference, target) pair repeated ``n`` times, in the paired DataModule's field names."""
    g = torch.Generator().manual_seed(seed)
    one = {"pixel_values": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
           "ref_pixel_values": torch.rand(1, 3, 64, 64, generator=g) * 2 - 1,
           "id": torch.randn(1, 512, generator=g), "ref_id": torch.randn(1, 512, generator=g),
           "exp": torch.randn(1, 55, generator=g), "ref_exp": torch.randn(1, 55, generator=g)}
    batch = {k: v.expand(n, *v.shape[1:]).clone() for k, v in one.items()}
    batch["skipped"] = torch.zeros(n, dtype=torch.long)
    return batch


def fixed_loss(module: ReferenceAdapterModule, batch: dict, seeds: range = range(8)) -> float:
    """Loss averaged over fixed noise/timestep draws, so before/after compare like with like."""
    module.eval()
    losses = []
    with torch.no_grad():
        for s in seeds:
            torch.manual_seed(s)
            losses.append(float(module.forward_loss(batch)))
    return sum(losses) / len(losses)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    return calls


# Loss on one pair after 60 steps over before (same fixed noise draws; an adapter that does not train stays at 1.0).
# Seeds 0-2 with native and AVX2 kernels gave 0.699-0.755 (tests/margins/reference_overfit.json, written by
# scripts/measure_margins.py), so the former 0.8 left 0.045; 0.85 keeps the policy's 0.05 and more.
THRESHOLDS = {"loss_after_vs_before": ("<", 0.85)}


def overfit_one_pair(tiny_base, seed: int = 0) -> tuple[ReferenceAdapterModule, L.Trainer, dict[str, float],
                                                         dict[str, torch.Tensor]]:
    """60 Lightning steps at lr 1e-2 on one (reference, target) pair; the module, its trainer, the loss ratio and
    the reference UNet's weights as loaded (a copy taken before training)."""
    L.seed_everything(seed)
    module = make_module(tiny_base)
    frozen = {k: v.clone() for k, v in module.ref_unet.state_dict().items()}
    batch = pair_batch(seed=seed)
    module.optim_cfg["lr"] = 1e-2
    before = fixed_loss(module, batch)
    module.train()
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, DataLoader([batch] * 60, batch_size=None))
    return module, trainer, {"loss_after_vs_before": fixed_loss(module, batch) / before}, frozen


def measure_figures(seed: int, work: Path) -> dict[str, float]:
    """``overfit_one_pair`` with ``seed`` on a freshly written tiny base, one thread as in the test
    (scripts/measure_margins.py)."""
    from blendexp.models.tiny import ensure_tiny_base

    torch.set_num_threads(1)
    return overfit_one_pair(ensure_tiny_base(work / "tiny"), seed)[2]


@pytest.mark.slow
def test_overfits_one_pair_and_keeps_only_trained_weights(tiny_base, tmp_path: Path) -> None:
    module, trainer, figures, frozen = overfit_one_pair(tiny_base)
    assert missed_thresholds(figures, THRESHOLDS) == []
    assert all(torch.equal(v, frozen[k]) for k, v in module.ref_unet.state_dict().items())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(".lora_" in k or "encoder_hid_proj" in k or "_ip." in k for k in state)
    assert any(".lora_" in k for k in state) and any("_ip." in k for k in state)  # trained jointly by default


def test_reference_unet_runs_once_per_step_only_for_kept_rows(tiny_base) -> None:
    module = make_module(tiny_base, dropout={"ref": 0.0})
    module.train()
    calls = count_calls(module.ref_unet)
    module.forward_loss(pair_batch(3))
    assert calls == [3]
    module.dropout_cfg = {"both": 1.0}  # the unconditional branch: no reference read at all
    module.forward_loss(pair_batch(3))
    assert calls == [3]
    dropped = torch.tensor([True, False, False, True, False, True])
    module.drop_mask = lambda key, n: dropped if key == "ref" else torch.zeros(n, dtype=torch.bool)
    module.forward_loss(pair_batch(6))
    assert calls[-1] == 3  # only the rows that read a reference


def test_frozen_expression_adapter_fine_tuned_lora_and_export(tiny_base, tmp_path: Path) -> None:
    donor = Arc2FaceBase.from_pretrained(*tiny_base)
    attach_expression_adapter(donor.unet)
    save_expression_adapter(donor.unet, tmp_path / "exp_adapter")
    with pytest.raises(ValueError, match="model.expression_adapter"):
        make_module(tiny_base, train_expression=False)
    first = make_module(tiny_base, expression_adapter=str(tmp_path / "exp_adapter"))
    assert not any(p.requires_grad for p in adapter_parameters(first.unet))
    assert first.trainable_names() and all(".lora_" in n for n in first.trainable_names())
    for p in reference_lora_parameters(first.unet):
        p.data.add_(0.1)
    assert [f.name for f in first.export(tmp_path / "export")] == ["pytorch_lora_weights.safetensors"]
    second = make_module(tiny_base, init_lora=str(tmp_path / "export"), expression_adapter=str(tmp_path / "exp_adapter"),
                         train_expression=True)
    for a, b in zip(reference_lora_parameters(first.unet), reference_lora_parameters(second.unet), strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.requires_grad for p in adapter_parameters(second.unet))
    files = second.export(tmp_path / "joint")
    assert sorted(str(f.relative_to(tmp_path / "joint")) for f in files) == [  # the official demo's folders
        "models/exp_adapter/exp_adapter.bin", "models/exp_adapter/exp_adapter.safetensors",
        "models/ref_adapter/pytorch_lora_weights.safetensors"]


def test_sample_grid_uses_identity_image_as_reference(tiny_base, tmp_path: Path) -> None:
    module = make_module(tiny_base)
    batch = pair_batch(3)
    batch["pixel_values"] = torch.rand(3, 3, 64, 64) * 2 - 1
    batch["key"] = [f"toy/subject{i}/still/0" for i in range(3)]
    datamodule = SimpleNamespace(preview=lambda n: {k: v[:n] for k, v in batch.items()})
    trainer = SimpleNamespace(datamodule=datamodule, default_root_dir=str(tmp_path), global_step=7, loggers=[])
    calls = count_calls(module.ref_unet)
    out = SampleGrid(n_identities=1, n_expressions=2, steps=2).render(trainer, module)
    assert out.name == "step_000007.png" and out.is_file()
    assert calls == [1, 1]  # one reference pass per grid image (one pipeline call per row), not one per step


@pytest.mark.slow
def test_cli_trains_on_pairs_and_exports(toy_shards: Path, tiny_base, tmp_path: Path) -> None:
    models, sd15 = tiny_base
    res = run_cli("blendexp.train", "+experiment=ref_adapter", f"data.sources.stills.shards={toy_shards}/train-000000.tar",
                  f"data.val_shards={toy_shards}/val-000000.tar", f"paths.models={models}", f"paths.sd15={sd15}",
                  f"paths.tiny_base={models.parent}", f"paths.outputs={tmp_path}", "data.num_workers=0",
                  "data.batch_size=4", "run_name=cli", "trainer.max_steps=6", "callbacks.samples.steps=2",
                  "callbacks.samples.every_n_steps=0", "callbacks.samples.n_identities=1",
                  "callbacks.samples.n_expressions=2",
                  "trainer.precision=bf16-mixed", "model.gradient_checkpointing=true")  # the GPU recipe's paths, on CPU
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Using bfloat16 Automatic Mixed Precision" in res.stdout + res.stderr
    export = tmp_path / "ref_adapter" / "cli" / "export" / "models"
    lora = export / "ref_adapter" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (export / "exp_adapter" / "exp_adapter.bin").is_file()
    assert str(lora) in res.stdout and "samples:" in res.stdout
