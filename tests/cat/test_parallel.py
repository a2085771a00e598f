"""cat/parallel.py: CatLoss is cat_loss as a module over the LoRA tensors; one process needs no DDP.
(Two ranks: tests/examples/test_examples.py runs data_parallel_cat_loss and accelerate around CatLoss.)"""

import warnings

import pytest
import torch

import cat_engine.cat.loss as loss_module
from cat_engine.cat import CatLoss, cat_loss, data_parallel_cat_loss
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters


def _unet_and_inputs():
    torch.manual_seed(0)
    unet = fuse_lora(add_lora(tiny_unet("sd"), rank=4, seed=1))
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.normal_(0.0, 0.05)
    g = torch.Generator().manual_seed(1)
    inputs = [
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 32, generator=g),
        torch.randn(2, 77, 32, generator=g),
        torch.randn(2, 4, 16, 16, generator=g),
    ]
    return unet, inputs


def test_cat_loss_module_is_cat_loss_over_the_lora_tensors():
    unet, inputs = _unet_and_inputs()
    module = data_parallel_cat_loss(unet)  # one process: the module itself
    assert type(module) is CatLoss and module.model is unet
    assert [id(p) for p in module.parameters()] == [id(p) for p in lora_parameters(unet)]
    out = module(*inputs, reduction="none", cat_weight=0.5)
    ref = cat_loss(unet, *inputs, reduction="none", cat_weight=0.5)
    torch.testing.assert_close(out.loss, ref.loss)
    with pytest.raises(ValueError, match="no trainable parameters"):
        CatLoss(tiny_unet("sd").requires_grad_(False))


def test_a_direct_call_in_a_process_group_warns_that_nothing_syncs(monkeypatch):
    import torch.distributed as dist

    unet, inputs = _unet_and_inputs()
    monkeypatch.setattr(loss_module, "_warned_unsynchronised", False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning, match="nothing synchronises the LoRA gradients"):
        cat_loss(unet, *inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only, and never from CatLoss
        cat_loss(unet, *inputs)
        monkeypatch.setattr(loss_module, "_warned_unsynchronised", False)
        CatLoss(unet)(*inputs)
