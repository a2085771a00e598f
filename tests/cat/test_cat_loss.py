"""cat_loss (one split-batch call) equals the three-pass reference: loss and every LoRA gradient.

Two references: ``cat_loss_reference`` on the same (fused) UNet, and an independent three-pass
computation written here on an unfused peft twin with peft's own ``disable_adapters``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cat_engine.cat.loss import CatLossOutput, batch_loss, cat_loss, cat_loss_reference, step_loss
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
BATCH = 2


def _models(family: str, checkpointing: bool):
    torch.manual_seed(0)
    peft = tiny_unet(family).eval()
    add_lora(peft, rank=4, seed=1)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the adapter would do nothing
                p.normal_(0.0, 0.05)
    engine = fuse_lora(copy.deepcopy(peft))
    if checkpointing:
        engine.enable_gradient_checkpointing()
    return engine, peft


def _inputs(unet, family: str, mode: str):
    g = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    z = torch.randn(BATCH, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    target = torch.randn(BATCH, 4, 16, 16, generator=g)
    token = torch.randn(BATCH, 77, width, generator=g)
    if mode == "distinct":  # class/strip modes: another caption per row
        plain = torch.randn(BATCH, 77, width, generator=g)
    else:  # "empty": one caption (the empty prompt) for every row
        plain = torch.randn(1, 77, width, generator=g).expand(BATCH, -1, -1).contiguous()
    added = plain_added = None
    if family == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(BATCH, 1)
        added = {"text_embeds": torch.randn(BATCH, 32, generator=g), "time_ids": time_ids}
        if mode == "distinct":
            plain_added = {"text_embeds": torch.randn(BATCH, 32, generator=g), "time_ids": time_ids}
        elif mode == "empty":
            pooled = torch.randn(1, 32, generator=g).expand(BATCH, -1).contiguous()
            plain_added = {"text_embeds": pooled, "time_ids": time_ids}
        # mode "same_pooled": plain_added None, the token rows' pooled embeds serve both
    return dict(
        noisy_latents=z,
        timesteps=t,
        token_embeds=token,
        plain_embeds=plain,
        target=target,
        added_cond_kwargs=added,
        plain_added_cond_kwargs=plain_added,
    )


def _step(unet, loss_fn, **kwargs):
    params = lora_parameters(unet)
    for p in params:
        p.grad = None
    out = loss_fn(unet, **kwargs)
    out.loss.backward()
    return out, [p.grad.clone() for p in params]


def _independent_three_pass(
    peft,
    noisy_latents,
    timesteps,
    token_embeds,
    plain_embeds,
    target,
    cat_weight=1.0,
    added_cond_kwargs=None,
    plain_added_cond_kwargs=None,
):
    """docs/design.md §1 with peft directly: adapter/token, adapter/plain, disable_adapters()/plain."""

    def call(embeds, added):
        kw = {"added_cond_kwargs": added} if added is not None else {}
        return peft(noisy_latents, timesteps, encoder_hidden_states=embeds, return_dict=False, **kw)[0]

    plain_added = plain_added_cond_kwargs if plain_added_cond_kwargs is not None else added_cond_kwargs
    ldm = F.mse_loss(call(token_embeds, added_cond_kwargs).float(), target.float())
    pred_plain = call(plain_embeds, plain_added)
    peft.disable_adapters()
    try:
        with torch.no_grad():
            pred_base = call(plain_embeds, plain_added)
    finally:
        peft.enable_adapters()
    cat = F.mse_loss(pred_plain.float(), pred_base.float())

    class Out:
        loss = ldm + cat_weight * cat

    return Out


def _assert_close(out, grads, ref_out, ref_grads):
    loss, ref = out.loss.item(), ref_out.loss.item()
    assert abs(loss - ref) <= LOSS_RTOL * abs(ref), (loss, ref)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert r.norm() > 0, "a reference LoRA gradient is zero: the test would not see a wrong one"
        err = ((g - r).norm() / r.norm()).item()
        assert err <= GRAD_RTOL, err


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("mode", ["distinct", "empty", "same_pooled"])
def test_cat_loss_equals_three_pass(family, checkpointing, mode):
    if mode == "same_pooled" and family == "sd":
        pytest.skip("SD1.5 has no pooled conditioning")
    engine, peft = _models(family, checkpointing)
    kwargs = _inputs(engine, family, mode)
    ref_out, ref_grads = _step(engine, cat_loss_reference, **kwargs)
    ind_out, ind_grads = _step(peft, _independent_three_pass, **kwargs)
    _assert_close(ind_out, ind_grads, ref_out, ref_grads)  # the two references agree
    for _ in range(2):  # the second step runs the recompute that skips each unit's frozen tail
        out, grads = _step(engine, cat_loss, **kwargs)
        _assert_close(out, grads, ref_out, ref_grads)
        _assert_close(out, grads, ind_out, ind_grads)
        assert abs(out.ldm.item() - ref_out.ldm.item()) <= LOSS_RTOL * abs(ref_out.ldm.item())
        assert abs(out.cat.item() - ref_out.cat.item()) <= LOSS_RTOL * abs(ref_out.cat.item())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cat_weight_zero_is_plain_lora(family):
    engine, peft = _models(family, checkpointing=False)
    kwargs = _inputs(engine, family, "distinct")
    ref_out, ref_grads = _step(engine, lambda u, **kw: cat_loss_reference(u, cat_weight=0.0, **kw), **kwargs)
    ind_out, ind_grads = _step(
        peft, lambda u, **kw: _independent_three_pass(u, cat_weight=0.0, **kw), **kwargs
    )
    out, grads = _step(engine, lambda u, **kw: cat_loss(u, cat_weight=0.0, **kw), **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)
    _assert_close(out, grads, ind_out, ind_grads)
    assert out.cat.item() == 0.0


def test_cat_weight_scales_the_cat_term():
    engine, _ = _models("sd", checkpointing=False)
    kwargs = _inputs(engine, "sd", "distinct")
    ref_out, ref_grads = _step(engine, lambda u, **kw: cat_loss_reference(u, cat_weight=0.3, **kw), **kwargs)
    out, grads = _step(engine, lambda u, **kw: cat_loss(u, cat_weight=0.3, **kw), **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)


def test_unfused_unet_runs_the_reference_with_a_warning():
    _, peft = _models("sd", checkpointing=False)
    kwargs = _inputs(peft, "sd", "distinct")
    ref_out, ref_grads = _step(peft, cat_loss_reference, **kwargs)
    import cat_engine.cat.loss as loss_module

    loss_module._warned_unfused = False
    with pytest.warns(UserWarning, match="not fused"):
        out, grads = _step(peft, cat_loss, **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("cat_weight", [1.0, 0.0])
def test_batch_loss_and_step_loss_are_cat_loss_on_a_cat_batch(cat_weight):
    """The CatBatch forms the trainer and the VRAM estimator run: the same loss and gradients."""
    engine, _ = _models("sdxl", checkpointing=False)
    kwargs = _inputs(engine, "sdxl", "distinct")
    batch = CatBatch(**kwargs)
    ref_out, ref_grads = _step(engine, lambda u, **kw: cat_loss(u, cat_weight=cat_weight, **kw), **kwargs)
    out, grads = _step(engine, lambda u, **kw: batch_loss(u, batch, cat_weight=cat_weight))
    _assert_close(out, grads, ref_out, ref_grads)
    loss, ldm, cat = step_loss(cat_weight)(engine, batch)
    out = CatLossOutput(loss, ldm, cat)
    _, grads = _step(engine, lambda u: out)
    _assert_close(out, grads, ref_out, ref_grads)
    assert torch.equal(ldm, ref_out.ldm) and torch.equal(cat, ref_out.cat)
    assert ldm.requires_grad is cat.requires_grad is False
