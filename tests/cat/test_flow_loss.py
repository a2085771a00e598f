"""flow_cat_loss (one split-batch call) equals the three-pass reference on every transformer family:
the loss to 1e-5 and every LoRA gradient to 1e-4 relative, fp32, CPU, with and without checkpointing.

Two references, as for the UNets (tests/cat/test_cat_loss.py): ``flow_cat_loss_reference`` on the
same fused transformer, and three calls written here on an unfused peft twin with peft's own
``disable_adapters``, each called as the family's diffusers pipeline calls it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cat_engine.cat.flow_loss import flow_cat_loss, flow_cat_loss_reference
from cat_engine.engine.builtin_dit import tiny_transformer
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.families.flux import TRAIN_GUIDANCE, image_ids, pack, unpack
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters, perturb_lora_b

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
BATCH = 2
TOKENS = 6


def _models(name: str, checkpointing: bool):
    torch.manual_seed(0)
    peft = tiny_transformer(name).eval()
    add_lora(peft, rank=4, targets=DIT_FAMILIES[name].default_targets, seed=1)
    perturb_lora_b(peft, 0.05)  # peft starts B at zero: make the delta show
    engine = fuse_lora(copy.deepcopy(peft))
    if checkpointing:
        engine.enable_gradient_checkpointing()
    return engine, peft


def _inputs(name: str, model):
    g = torch.Generator().manual_seed(1)
    family = DIT_FAMILIES[name]

    def make(shape):
        return torch.randn(shape, generator=g)

    config = dict(model.config)
    z = make((BATCH, family.latent_channels(config), 16, 16))
    token = family.example_prompt(config, BATCH, TOKENS, make)
    plain = family.example_prompt(config, BATCH, TOKENS, make)
    if plain.mask is not None:
        plain.mask[:, -2:] = False  # shorter captions, as without the trigger token
    t = torch.rand(BATCH, generator=g) * 1000
    return dict(noisy_latents=z, timesteps=t, token=token, plain=plain, target=make(z.shape))


def _pipeline_call(name, model, z, t, prompt):
    """The transformer called as the family's diffusers pipeline calls it; the velocity back."""
    if name == "sd3":
        return model(
            hidden_states=z, timestep=t, encoder_hidden_states=prompt.embeds, pooled_projections=prompt.pooled
        ).sample
    if name == "flux":
        n, _, h, w = z.shape
        out = model(
            hidden_states=pack(z),
            timestep=t / 1000,
            guidance=torch.full((n,), TRAIN_GUIDANCE),
            pooled_projections=prompt.pooled,
            encoder_hidden_states=prompt.embeds,
            txt_ids=torch.zeros(prompt.embeds.shape[1], 3),
            img_ids=image_ids(h, w, z.device, z.dtype),
        ).sample
        return unpack(out, h, w)
    captions = [e[m] for e, m in zip(prompt.embeds, prompt.mask)]
    out = model(list(z.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions).sample
    return -torch.stack(out).squeeze(2)


def _independent_three_pass(name, peft, noisy_latents, timesteps, token, plain, target):
    ldm = F.mse_loss(_pipeline_call(name, peft, noisy_latents, timesteps, token), target)
    pred_plain = _pipeline_call(name, peft, noisy_latents, timesteps, plain)
    peft.disable_adapters()
    try:
        with torch.no_grad():
            pred_base = _pipeline_call(name, peft, noisy_latents, timesteps, plain)
    finally:
        peft.enable_adapters()
    return ldm + F.mse_loss(pred_plain, pred_base)


def _grads(model, loss):
    params = lora_parameters(model)
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in params]


def _assert_close(loss, grads, want_loss, want_grads):
    assert abs(loss.item() - want_loss.item()) <= LOSS_RTOL * abs(want_loss.item())
    assert len(grads) == len(want_grads) and grads
    for g, w in zip(grads, want_grads):
        assert (g - w).norm() <= GRAD_RTOL * w.norm(), (g - w).norm() / w.norm()


@pytest.mark.parametrize("name", list(DIT_FAMILIES))
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_split_batch_equals_three_pass_references(name, checkpointing):
    engine, peft = _models(name, checkpointing)
    inputs = _inputs(name, engine)
    out = flow_cat_loss(engine, **inputs)
    grads = _grads(engine, out.loss)
    ref = flow_cat_loss_reference(engine, **inputs)
    ref_grads = _grads(engine, ref.loss)
    _assert_close(out.loss, grads, ref.loss, ref_grads)
    independent = _independent_three_pass(name, peft, **inputs)
    _assert_close(out.loss, grads, independent, _grads(peft, independent))
    # Not vacuous: the adapter moves the plain rows away from the base model's, and the gradients
    # reach every LoRA layer (but the query of SD3's last context stream, whose output is dropped).
    assert out.cat.item() > 0 and sum(bool(g.any()) for g in grads) >= len(grads) - 2
    # A second step runs the recompute with the frozen tails skipped: still equal.
    out2 = flow_cat_loss(engine, **inputs)
    _assert_close(out2.loss, _grads(engine, out2.loss), ref.loss, ref_grads)


@pytest.mark.parametrize("name", list(DIT_FAMILIES))
def test_cat_weight_zero_is_plain_flow_matching(name):
    engine, _ = _models(name, False)
    inputs = _inputs(name, engine)
    out = flow_cat_loss(engine, **inputs, cat_weight=0.0)
    want = F.mse_loss(
        _pipeline_call(name, engine, inputs["noisy_latents"], inputs["timesteps"], inputs["token"]),
        inputs["target"],
    )
    torch.testing.assert_close(out.loss, want)
    assert out.cat.item() == 0


def test_refuses_a_unet():
    from cat_engine.engine.builtin import tiny_unet

    with pytest.raises(ValueError, match="not a transformer family"):
        flow_cat_loss(tiny_unet(), None, None, None, None, None)
