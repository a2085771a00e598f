"""Split-batch UNet call: right outputs per row group, base rows never in autograd, UNet left as found."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.lora import adapters_disabled, add_lora, fuse_lora, lora_parameters
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.split_unet import split_batch_call

B = 3  # 3B = 9 rows, 2B = 6: neither is a head count or a width of the tiny UNets


def _unet(family="sd", checkpointing=False):
    torch.manual_seed(0)
    unet = tiny_unet(family).eval()
    add_lora(unet, rank=4, seed=1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    fuse_lora(unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def _batch(unet, family, same_pooled=False):
    g = torch.Generator().manual_seed(2)
    width = unet.config.cross_attention_dim
    z = torch.randn(B, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    token, plain = torch.randn(B, 77, width, generator=g), torch.randn(B, 77, width, generator=g)
    embeds = torch.cat([token, plain, plain])
    added = None
    if family == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(B, 1)
        pooled_t = torch.randn(B, 32, generator=g)
        pooled_p = pooled_t if same_pooled else torch.randn(B, 32, generator=g)
        added = {"text_embeds": torch.cat([pooled_t, pooled_p, pooled_p]), "time_ids": time_ids.repeat(3, 1)}
    return z, t, embeds, added


def _plain_call(unet, z, t, embeds, added):
    kw = {"added_cond_kwargs": added} if added is not None else {}
    return unet(z, t, encoder_hidden_states=embeds, return_dict=False, **kw)[0]


def _rows(d, sl):
    return None if d is None else {k: v[sl] for k, v in d.items()}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("strategy", ["ckpt", "split", "two_calls", "checkpoint"])
def test_rows_match_separate_calls(family, strategy):
    unet = _unet(family, checkpointing=strategy == "ckpt")
    z, t, embeds, added = _batch(unet, family)
    no_ckpt = "split" if strategy == "ckpt" else strategy
    with torch.no_grad():
        with adapter_rows(unet, None):
            want_adapter = _plain_call(
                unet, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * B], _rows(added, slice(0, 2 * B))
            )
        with adapters_disabled(unet):
            want_base = _plain_call(unet, z, t, embeds[2 * B :], _rows(added, slice(2 * B, None)))
    pred = split_batch_call(unet, z, t, embeds, 2 * B, added, no_checkpoint=no_ckpt)
    assert pred.shape == (3 * B, 4, 16, 16)
    torch.testing.assert_close(pred[: 2 * B], want_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred[2 * B :], want_base, rtol=1e-5, atol=1e-5)
    # The adapter acts: without it the adapter rows would equal the base model's.
    assert (pred[B : 2 * B] - pred[2 * B :]).abs().max() > 1e-4


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_base_rows_never_saved_for_backward(checkpointing):
    unet = _unet("sd", checkpointing)
    z, t, embeds, _ = _batch(unet, "sd")
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    leading = []

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            leading.append(x.shape[0] if x.dim() else None)
            # A saved view keeps its whole base alive: the base must hold adapter rows only too.
            if x._base is not None and x._base.dim():
                leading.append(x._base.shape[0])
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        pred = split_batch_call(unet, z, t, embeds, 2 * B, None)
    assert leading, "nothing was saved: the test would not see base rows"
    assert 3 * B not in leading and B not in leading
    pred[: 2 * B].square().mean().backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_backward_runs_adapter_rows_only(checkpointing):
    """Backward FLOPs of the split call equal those of a LoRA step on the 2B adapter rows."""
    unet = _unet("sd", checkpointing)
    z, t, embeds, _ = _batch(unet, "sd")

    def backward_flops(forward):
        for _ in range(2):  # the second backward is the steady state (checkpoint tails learned)
            loss = forward().square().mean()
            counter = FlopCounterMode(display=False)
            with counter:
                loss.backward()
        return counter.get_total_flops()

    split = backward_flops(lambda: split_batch_call(unet, z, t, embeds, 2 * B, None)[: 2 * B])
    lora = backward_flops(lambda: _plain_call(unet, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * B], None))
    # With checkpointing this includes the recompute: of 2B rows, skipping the same frozen tail
    # as torch's checkpoint (early stop).
    assert split == lora


def test_base_rows_give_no_gradient():
    unet = _unet("sd", checkpointing=True)
    z, t, embeds, _ = _batch(unet, "sd")
    pred = split_batch_call(unet, z, t, embeds, 2 * B, None)
    pred[2 * B :].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in lora_parameters(unet))


@pytest.mark.parametrize("same_pooled", [False, True])
@pytest.mark.parametrize("strategy", ["ckpt", "split"])
def test_work_before_the_first_lora_layer_runs_once_per_distinct_group(same_pooled, strategy):
    """One-call modes (checkpointing, or the "split" strategy without it) share the pre-LoRA work."""
    unet = _unet("sdxl", checkpointing=strategy == "ckpt")
    z, t, embeds, added = _batch(unet, "sdxl", same_pooled)
    rows = {}

    def record(name):
        def hook(module, inputs, output):
            rows.setdefault(name, []).append(inputs[0].shape[0])

        return hook

    conv = unet.conv_in._conv_forward  # below the module call, which the engine wraps

    def conv_in(x, *args):
        rows.setdefault("conv_in", []).append(x.shape[0])
        return conv(x, *args)

    unet.conv_in._conv_forward = conv_in
    handles = [
        unet.down_blocks[0].resnets[0].register_forward_hook(record("resnet0")),
        unet.down_blocks[0]
        .attentions[0]
        .transformer_blocks[0]
        .register_forward_hook(record("first_lora_block")),
    ]
    try:
        split_batch_call(unet, z, t, embeds, 2 * B, added, no_checkpoint="split")
    finally:
        for h in handles:
            h.remove()
        del unet.conv_in._conv_forward
    assert rows["conv_in"] == [B]  # same z_t for token, plain and base rows
    # The time embedding carries the pooled text: token rows differ from plain ones unless equal.
    assert rows["resnet0"] == [B if same_pooled else 2 * B]
    # From the first LoRA layer on, every row is its own: all rows in the checkpointed no-grad
    # forward, or row-split (base rows, then adapter rows).
    assert rows["first_lora_block"] == ([3 * B] if strategy == "ckpt" else [B, 2 * B])


def test_unet_is_left_as_found():
    unet = _unet("sd", checkpointing=True)
    before = {
        n: (getattr(m, "gradient_checkpointing", None), m.__dict__.get("_gradient_checkpointing_func"))
        for n, m in unet.named_modules()
    }
    z, t, embeds, _ = _batch(unet, "sd")
    split_batch_call(unet, z, t, embeds, 2 * B, None).sum().backward()
    after = {
        n: (getattr(m, "gradient_checkpointing", None), m.__dict__.get("_gradient_checkpointing_func"))
        for n, m in unet.named_modules()
    }
    assert before == after
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
    unet.disable_gradient_checkpointing()
    split_batch_call(unet, z, t, embeds, 2 * B, None)
    assert not unet.is_gradient_checkpointing


def test_all_rows_adapter_rows_is_a_plain_lora_call():
    unet = _unet("sd", checkpointing=True)
    z, t, embeds, _ = _batch(unet, "sd")
    twin = copy.deepcopy(unet)
    pred = split_batch_call(unet, z, t, embeds[:B], B, None)
    pred.square().mean().backward()
    want = _plain_call(twin, z, t, embeds[:B], None)
    want.square().mean().backward()
    torch.testing.assert_close(pred, want)
    for g, w in zip(lora_parameters(unet), lora_parameters(twin)):
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-4, atol=1e-7)


def test_no_adapter_rows_builds_no_graph():
    unet = _unet("sd")
    z, t, embeds, _ = _batch(unet, "sd")
    assert not split_batch_call(unet, z, t, embeds[2 * B :], 0, None).requires_grad


def test_refuses_unfused_peft_layers():
    torch.manual_seed(0)
    unet = add_lora(tiny_unet("sd").eval(), rank=4, seed=1)
    z, t, embeds, _ = _batch(unet, "sd")
    with pytest.raises(ValueError, match="fuse_lora"):
        split_batch_call(unet, z, t, embeds, 2 * B, None)


def test_refuses_dropout_in_training_mode():
    unet = _unet("sd")
    torch.manual_seed(0)
    unet.train()
    for m in unet.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    z, t, embeds, _ = _batch(unet, "sd")
    with pytest.raises(ValueError, match="dropout"):
        split_batch_call(unet, z, t, embeds, 2 * B, None)


def test_bad_row_counts():
    unet = _unet("sd")
    z, t, embeds, _ = _batch(unet, "sd")
    with pytest.raises(ValueError, match="multiple"):
        split_batch_call(unet, z[:2], t[:2], embeds, 2 * B, None)
    with pytest.raises(ValueError, match="adapter_rows"):
        split_batch_call(unet, z, t, embeds, 4 * B, None)
