"""ExpressionAdapterModule internals: what trains, loss options, condition dropout and slim checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blendexp.modules.expression import ExpressionAdapterModule


def make(tiny_base: tuple[Path, Path], **overrides) -> ExpressionAdapterModule:
    models, sd15 = tiny_base
    kw = dict(base={"models": str(models), "sd15": str(sd15)}, adapter={"num_tokens": 4, "projection": "linear"},
              noise={}, dropout={}, optim={"lr": 1e-3})
    kw.update(overrides)
    return ExpressionAdapterModule(**kw)


def batch(n: int = 2) -> dict:
    torch.manual_seed(0)
    return {"pixel_values": torch.rand(n, 3, 64, 64) * 2 - 1, "id": torch.randn(n, 512), "exp": torch.randn(n, 55)}


@pytest.mark.parametrize("noise", [{"prediction_type": "epsilon"}, {"snr_gamma": 5.0}])
def test_only_adapter_gets_gradients(tiny_base, noise: dict) -> None:
    module = make(tiny_base, noise=noise)
    loss = module.forward_loss(batch())
    assert torch.isfinite(loss)
    loss.backward()
    trained = module.trainable_names()
    assert trained and all("encoder_hid_proj" in n or "to_k_ip" in n or "to_v_ip" in n for n in trained)
    for name, p in module.named_parameters():
        assert (p.grad is not None) == (name in trained), name


def test_adapter_cannot_change_what_the_base_predicts(tiny_base) -> None:
    with pytest.raises(ValueError, match="predicts epsilon.*model.noise.prediction_type=null"):
        make(tiny_base, noise={"prediction_type": "v_prediction"})


def test_dropout_replaces_conditions(tiny_base) -> None:
    module = make(tiny_base, dropout={"id": 1.0})
    module.train()
    ids = torch.randn(3, 512)
    dropped = module.id_embeds(ids, module.drop_mask("id", 3))
    torch.testing.assert_close(dropped, module.empty_embeds.expand(3, -1, -1))
    module.eval()  # no dropout outside training
    assert not module.drop_mask("id", 3).any()


def test_checkpoint_keeps_only_trained_weights(tiny_base) -> None:
    module = make(tiny_base)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert set(ckpt["state_dict"]) == module.trainable_names()
    fresh = make(tiny_base)
    fresh.strict_loading = False
    fresh.load_state_dict(ckpt["state_dict"], strict=False)
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(fresh.state_dict()[name], value)


def test_fine_tunes_an_existing_adapter(tiny_base, tmp_path: Path) -> None:
    first = make(tiny_base, adapter={"num_tokens": 6, "projection": "mlp", "mult": 2})
    for p in first.parameters():
        if p.requires_grad:
            p.data.add_(0.1)
    first.export(tmp_path)
    second = make(tiny_base, init_adapter=str(tmp_path))  # the export folder: models/exp_adapter/ under it
    assert second.trainable_names() == first.trainable_names()
    for name in first.trainable_names():
        torch.testing.assert_close(second.state_dict()[name], first.state_dict()[name])


def test_sample_rows_follow_their_own_expression(tiny_base) -> None:
    # diffusers treats precomputed IP embeds as shared by a batch; each grid row must still get its own expression
    module = make(tiny_base)
    for p in module.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.3)
    ids, exps = torch.randn(1, 512).repeat(2, 1), torch.zeros(2, 55)
    exps[1, :8] = 3.0
    both = module.sample_images(ids, exps, seeds=[0, 0], steps=2)
    alone = module.sample_images(ids[1:], exps[1:], seeds=[0], steps=2)
    assert (both[0] != both[1]).any()
    assert (both[1] == alone[0]).all()


def test_sample_grid_is_the_pipelines_image_of_the_export(tiny_base, tmp_path: Path) -> None:
    # one sampling path: a training grid shows exactly what ExpressionPipeline makes from the exported adapter
    from blendexp.pipeline import ExpressionPipeline

    module = make(tiny_base)
    for p in module.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.3)
    module.export(tmp_path)
    torch.manual_seed(1)
    ids, exps = torch.randn(2, 512), torch.randn(2, 55)
    grid = module.sample_images(ids, exps, seeds=[5, 6], steps=3, guidance=2.0)
    pipe = ExpressionPipeline.from_pretrained(*tiny_base, expression_adapter=tmp_path)
    for i, seed in enumerate([5, 6]):
        assert (pipe(ids[i].numpy(), exps[i].numpy(), seed=seed, steps=3, guidance=2.0)[0] == grid[i]).all()


def test_gradient_checkpointing_trades_memory_not_results(tiny_base) -> None:
    plain, checkpointed = make(tiny_base), make(tiny_base, gradient_checkpointing=True)
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    checkpointed.load_state_dict(plain.state_dict())  # the same fresh adapter
    losses = []
    for module in (plain, checkpointed):
        module.train()
        torch.manual_seed(3)  # the same noise and timesteps
        losses.append(module.forward_loss(batch()))
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (plain, checkpointed)]
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
