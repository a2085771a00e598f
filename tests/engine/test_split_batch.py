"""Split-batch call: right outputs per row group, base rows never in autograd, the model left as found.

On the UNets (``sd``, ``sdxl``) and the diffusion transformers (``sd3``, ``flux``, ``zimage``;
``engine/families/``), whose units are the blocks diffusers checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cat_engine.bench import measure
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.builtin_dit import tiny_transformer
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import adapters_disabled, add_lora, fuse_lora, lora_parameters, perturb_lora_b
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.split_unet import split_batch_call

B = 3  # 3B = 9 rows, 2B = 6: neither is a head count or a width of the tiny models
TRANSFORMERS = list(DIT_FAMILIES)
TOKENS = 7  # transformers' text tokens: Flux's rotary table has 7 + 64 positions, no row count


def _unet(family="sd", checkpointing=False, checkpoint_func=None):
    """The tiny model of ``family`` with LoRA (a transformer: its family's default targets), B != 0, fused."""
    torch.manual_seed(0)
    if family in DIT_FAMILIES:
        unet = tiny_transformer(family).eval()
        add_lora(unet, rank=4, targets=DIT_FAMILIES[family].default_targets, seed=1)
    else:
        unet = tiny_unet(family).eval()
        add_lora(unet, rank=4, seed=1)
    perturb_lora_b(unet, 0.05)  # peft starts B at zero: make the delta show
    fuse_lora(unet)
    if checkpointing:
        kwargs = {} if checkpoint_func is None else {"gradient_checkpointing_func": checkpoint_func}
        unet.enable_gradient_checkpointing(**kwargs)
    return unet


def _transformer_batch(unet, family, latent=16, tokens=TOKENS):
    """z_t, t [B] and a transformer's split-batch embeddings and conditioning: [token, plain, plain]."""
    batch = DIT_FAMILIES[family].example_batch(
        unet.config, B, latent, tokens, generator=torch.Generator().manual_seed(2)
    )
    embeds = torch.cat([batch.token_embeds, batch.plain_embeds, batch.plain_embeds])
    token, plain = batch.added_cond_kwargs, batch.plain_added_cond_kwargs
    added = {k: torch.cat([token[k], plain[k], plain[k]]) for k in token}
    return batch.noisy_latents, batch.timesteps, embeds, added


def _batch(unet, family, same_pooled=False):
    if family in DIT_FAMILIES:
        return _transformer_batch(unet, family)
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
    return unet_forward(unet, z, t, embeds, added)


def _rows(d, sl):
    return None if d is None else {k: v[sl] for k, v in d.items()}


@pytest.mark.parametrize("family", ["sd", "sdxl", *TRANSFORMERS])
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
    assert pred.shape == (3 * B, *z.shape[1:])
    torch.testing.assert_close(pred[: 2 * B], want_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred[2 * B :], want_base, rtol=1e-5, atol=1e-5)
    # The adapter acts: without it the adapter rows would equal the base model's.
    assert (pred[B : 2 * B] - pred[2 * B :]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd", *TRANSFORMERS])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_base_rows_never_saved_for_backward(family, checkpointing):
    unet = _unet(family, checkpointing)
    z, t, embeds, added = _batch(unet, family)
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
        pred = split_batch_call(unet, z, t, embeds, 2 * B, added)
    assert leading, "nothing was saved: the test would not see base rows"
    assert 3 * B not in leading and B not in leading
    pred[: 2 * B].square().mean().backward()


@pytest.mark.parametrize("family", ["sd", *TRANSFORMERS])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_backward_runs_adapter_rows_only(family, checkpointing):
    """Backward FLOPs of the split call equal those of a LoRA step on the 2B adapter rows."""
    unet = _unet(family, checkpointing)
    z, t, embeds, added = _batch(unet, family)

    def backward_flops(forward):
        for _ in range(2):  # the second backward is the steady state (checkpoint tails learned)
            loss = forward().square().mean()
            counter = FlopCounterMode(display=False)
            with counter:
                loss.backward()
        return counter.get_total_flops()

    split = backward_flops(lambda: split_batch_call(unet, z, t, embeds, 2 * B, added)[: 2 * B])
    lora = backward_flops(
        lambda: _plain_call(
            unet, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * B], _rows(added, slice(0, 2 * B))
        )
    )
    # With checkpointing this includes the recompute: of 2B rows, skipping the same frozen tail
    # as torch's checkpoint (early stop).
    assert split == lora


@pytest.mark.parametrize("family", ["sd", *TRANSFORMERS])
def test_base_rows_give_no_gradient(family):
    unet = _unet(family, checkpointing=True)
    z, t, embeds, added = _batch(unet, family)
    pred = split_batch_call(unet, z, t, embeds, 2 * B, added)
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


@pytest.mark.parametrize("family", ["sd", *TRANSFORMERS])
def test_unet_is_left_as_found(family):
    unet = _unet(family, checkpointing=True)
    before = {
        n: (getattr(m, "gradient_checkpointing", None), m.__dict__.get("_gradient_checkpointing_func"))
        for n, m in unet.named_modules()
    }
    z, t, embeds, added = _batch(unet, family)
    split_batch_call(unet, z, t, embeds, 2 * B, added).sum().backward()
    after = {
        n: (getattr(m, "gradient_checkpointing", None), m.__dict__.get("_gradient_checkpointing_func"))
        for n, m in unet.named_modules()
    }
    assert before == after
    assert not [n for n, m in unet.named_modules() if "forward" in m.__dict__]
    unet.disable_gradient_checkpointing()
    split_batch_call(unet, z, t, embeds, 2 * B, added)
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


def test_flux_position_ids_are_never_split_as_rows():
    """Flux's rotary table is one for all rows: with as many positions as rows it must still not be
    cut into row groups (4 image + 5 text tokens = 9 positions = 3B rows)."""
    unet = _unet("flux", checkpointing=True)
    z, t, embeds, added = _transformer_batch(unet, "flux", latent=4, tokens=3 * B - 4)
    calls = []
    unet.pos_embed.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    pred = split_batch_call(unet, z, t, embeds, 2 * B, added, no_checkpoint="split")
    assert calls == [3 * B]  # one call over all 9 positions
    with torch.no_grad(), adapters_disabled(unet):
        want_base = _plain_call(unet, z, t, embeds[2 * B :], _rows(added, slice(2 * B, None)))
    torch.testing.assert_close(pred[2 * B :], want_base, rtol=1e-5, atol=1e-5)


def _mse(a, b):
    return torch.nn.functional.mse_loss(a.float(), b.float())


@pytest.mark.parametrize("family", TRANSFORMERS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_cat_step_costs_at_most_lora_plus_one_no_grad_forward(family, checkpointing):
    """On the transformers, as tests/bench/test_split_overhead.py checks on the UNets:
    FLOPs(CAT step) <= (FLOPs(LoRA step on 2B rows) + FLOPs(no-grad forward of B rows)) * 1.03 and
    saved bytes(CAT step) <= saved bytes(LoRA step on 2B rows) * 1.05. The LoRA step is checkpointed
    with torch's non-reentrant checkpoint (diffusers' default), whose kept inputs
    ``measure.counting_checkpoint`` counts."""
    unet = _unet(family, checkpointing, checkpoint_func=measure.counting_checkpoint)
    z, t, embeds, added = _batch(unet, family)
    target = torch.randn_like(z)
    ada, base = slice(0, 2 * B), slice(2 * B, None)

    def cat_loss():
        pred = split_batch_call(unet, z, t, embeds, 2 * B, added)
        return _mse(pred[:B], target) + _mse(pred[B : 2 * B], pred[2 * B :].detach())

    def lora_loss():
        with adapter_rows(unet, None):
            pred = _plain_call(unet, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[ada], _rows(added, ada))
        return _mse(pred, target.repeat(2, 1, 1, 1))

    def forward_b():
        with torch.no_grad():
            return _plain_call(unet, z, t, embeds[base], _rows(added, base))

    def step(loss_fn):
        def run():
            for p in lora_parameters(unet):
                p.grad = None
            loss_fn().backward()

        return run

    step(cat_loss)()  # the recompute learns each unit's frozen tail on its first backward
    flops = {name: measure.count_flops(f) for name, f in [("cat", step(cat_loss)), ("lora", step(lora_loss))]}
    flops["fwd_b"] = measure.count_flops(forward_b)
    weights = list(unet.parameters())
    saved = {"cat": measure.saved_bytes(cat_loss, weights), "lora": measure.saved_bytes(lora_loss, weights)}
    assert flops["cat"] <= (flops["lora"] + flops["fwd_b"]) * 1.03, flops
    assert saved["cat"] <= saved["lora"] * 1.05, saved
    assert flops["cat"] > flops["lora"]  # not vacuous: the base rows' forward is in the CAT step
