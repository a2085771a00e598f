"""The split batch on diffusion transformers (SD3, Flux, Z-Image): right rows, base rows never in
autograd, backward and FLOPs of a LoRA step, the model left as found (docs/design.md §4, §7b)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cat_engine.bench import measure
from cat_engine.engine.builtin_dit import tiny_transformer
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import adapters_disabled, add_lora, fuse_lora, lora_parameters
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.split_unet import split_batch_call

FAMILIES = list(DIT_FAMILIES)
B = 3  # 3B = 9 rows, 2B = 6: neither a head count nor a width of the tiny transformers
TOKENS = 7  # text tokens: Flux's rotary table has 7 + 64 positions, no row count
LATENT = 16


def lora_transformer(name: str, checkpointing: bool = False, checkpoint_func=None):
    """The tiny transformer with the family's default LoRA targets, non-zero B, fused."""
    torch.manual_seed(0)
    model = tiny_transformer(name).eval()
    add_lora(model, rank=4, targets=DIT_FAMILIES[name].default_targets, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    fuse_lora(model)
    if checkpointing:
        kwargs = {} if checkpoint_func is None else {"gradient_checkpointing_func": checkpoint_func}
        model.enable_gradient_checkpointing(**kwargs)
    return model


def cat_inputs(name: str, model, latent: int = LATENT, tokens: int = TOKENS):
    """z_t, t [B] and the split batch's embeddings and conditioning: [token, plain, plain]."""
    batch = DIT_FAMILIES[name].example_batch(
        model.config, B, latent, tokens, generator=torch.Generator().manual_seed(2)
    )
    embeds = torch.cat([batch.token_embeds, batch.plain_embeds, batch.plain_embeds])
    token, plain = batch.added_cond_kwargs, batch.plain_added_cond_kwargs
    added = {k: torch.cat([token[k], plain[k], plain[k]]) for k in token}
    return batch.noisy_latents, batch.timesteps, embeds, added


def _rows(d, sl):
    return {k: v[sl] for k, v in d.items()}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("strategy", ["ckpt", "split", "two_calls", "checkpoint"])
def test_rows_match_separate_calls(name, strategy):
    model = lora_transformer(name, checkpointing=strategy == "ckpt")
    z, t, embeds, added = cat_inputs(name, model)
    no_ckpt = "split" if strategy == "ckpt" else strategy
    with torch.no_grad():
        with adapter_rows(model, None):
            want_adapter = unet_forward(
                model, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * B], _rows(added, slice(0, 2 * B))
            )
        with adapters_disabled(model):
            want_base = unet_forward(model, z, t, embeds[2 * B :], _rows(added, slice(2 * B, None)))
    pred = split_batch_call(model, z, t, embeds, 2 * B, added, no_checkpoint=no_ckpt)
    assert pred.shape == (3 * B, *z.shape[1:])
    torch.testing.assert_close(pred[: 2 * B], want_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred[2 * B :], want_base, rtol=1e-5, atol=1e-5)
    # The adapter acts: without it the adapter rows would equal the base model's.
    assert (pred[B : 2 * B] - pred[2 * B :]).abs().max() > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_base_rows_never_saved_for_backward(name, checkpointing):
    model = lora_transformer(name, checkpointing)
    z, t, embeds, added = cat_inputs(name, model)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    leading = []

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            leading.append(x.shape[0] if x.dim() else None)
            if x._base is not None and x._base.dim():  # a saved view keeps its whole base alive
                leading.append(x._base.shape[0])
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        pred = split_batch_call(model, z, t, embeds, 2 * B, added)
    assert leading, "nothing was saved: the test would not see base rows"
    assert 3 * B not in leading and B not in leading
    pred[: 2 * B].square().mean().backward()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_backward_runs_adapter_rows_only(name, checkpointing):
    """Backward FLOPs of the split call equal those of a LoRA step on the 2B adapter rows."""
    model = lora_transformer(name, checkpointing)
    z, t, embeds, added = cat_inputs(name, model)

    def backward_flops(forward):
        for _ in range(2):  # the second backward is the steady state (checkpoint tails learned)
            loss = forward().square().mean()
            counter = FlopCounterMode(display=False)
            with counter:
                loss.backward()
        return counter.get_total_flops()

    split = backward_flops(lambda: split_batch_call(model, z, t, embeds, 2 * B, added)[: 2 * B])
    lora = backward_flops(
        lambda: unet_forward(
            model, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[: 2 * B], _rows(added, slice(0, 2 * B))
        )
    )
    assert split == lora


@pytest.mark.parametrize("name", FAMILIES)
def test_base_rows_give_no_gradient(name):
    model = lora_transformer(name, checkpointing=True)
    z, t, embeds, added = cat_inputs(name, model)
    pred = split_batch_call(model, z, t, embeds, 2 * B, added)
    pred[2 * B :].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in lora_parameters(model))


def test_flux_position_ids_are_never_split_as_rows():
    """Flux's rotary table is one for all rows: with as many positions as rows it must still not be
    cut into row groups (4 image + 5 text tokens = 9 positions = 3B rows)."""
    model = lora_transformer("flux", checkpointing=True)
    z, t, embeds, added = cat_inputs("flux", model, latent=4, tokens=3 * B - 4)
    calls = []
    model.pos_embed.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    pred = split_batch_call(model, z, t, embeds, 2 * B, added, no_checkpoint="split")
    assert calls == [3 * B]  # one call over all 9 positions
    with torch.no_grad(), adapters_disabled(model):
        want_base = unet_forward(model, z, t, embeds[2 * B :], _rows(added, slice(2 * B, None)))
    torch.testing.assert_close(pred[2 * B :], want_base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_model_is_left_as_found(name):
    model = lora_transformer(name, checkpointing=True)

    def state():
        return {
            n: (getattr(m, "gradient_checkpointing", None), m.__dict__.get("_gradient_checkpointing_func"))
            for n, m in model.named_modules()
        }

    before = state()
    z, t, embeds, added = cat_inputs(name, model)
    split_batch_call(model, z, t, embeds, 2 * B, added).sum().backward()
    assert state() == before
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__]


# ------------------------------------------------------------------------------- accounting
FLOPS_SLACK = 1.03
SAVED_SLACK = 1.05


def _mse(a, b):
    return torch.nn.functional.mse_loss(a.float(), b.float())


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_cat_step_costs_at_most_lora_plus_one_no_grad_forward(name, checkpointing):
    """FLOPs(CAT step) <= (FLOPs(LoRA step on 2B rows) + FLOPs(no-grad forward of B rows)) * 1.03 and
    saved bytes(CAT step) <= saved bytes(LoRA step on 2B rows) * 1.05, as for the UNets
    (tests/bench/test_split_overhead.py). The LoRA step is checkpointed with torch's non-reentrant
    checkpoint (diffusers' default), whose kept inputs ``measure.counting_checkpoint`` counts."""
    model = lora_transformer(name, checkpointing, checkpoint_func=measure.counting_checkpoint)
    z, t, embeds, added = cat_inputs(name, model)
    target = torch.randn_like(z)
    ada, base = slice(0, 2 * B), slice(2 * B, None)

    def cat_loss():
        pred = split_batch_call(model, z, t, embeds, 2 * B, added)
        return _mse(pred[:B], target) + _mse(pred[B : 2 * B], pred[2 * B :].detach())

    def lora_loss():
        with adapter_rows(model, None):
            pred = unet_forward(model, z.repeat(2, 1, 1, 1), t.repeat(2), embeds[ada], _rows(added, ada))
        return _mse(pred, target.repeat(2, 1, 1, 1))

    def forward_b():
        with torch.no_grad():
            return unet_forward(model, z, t, embeds[base], _rows(added, base))

    def step(loss_fn):
        def run():
            for p in lora_parameters(model):
                p.grad = None
            loss_fn().backward()

        return run

    step(cat_loss)()  # the recompute learns each unit's frozen tail on its first backward
    flops = {
        k: measure.count_flops(f)
        for k, f in [("cat", step(cat_loss)), ("lora", step(lora_loss)), ("fwd_b", forward_b)]
    }
    weights = list(model.parameters())
    saved = {"cat": measure.saved_bytes(cat_loss, weights), "lora": measure.saved_bytes(lora_loss, weights)}
    assert flops["cat"] <= (flops["lora"] + flops["fwd_b"]) * FLOPS_SLACK, flops
    assert saved["cat"] <= saved["lora"] * SAVED_SLACK, saved
    assert flops["cat"] > flops["lora"]  # not vacuous: the base rows' forward is in the CAT step
