"""Min-SNR weights against a hand computation, and the per-row losses against cat_loss and its
three-call reference, gradients included."""

from __future__ import annotations

import pytest
import torch

from cat_engine.cat.loss import batch_loss, mse
from cat_engine.cat.loss_options import min_snr_step_loss, min_snr_weights, row_losses
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.builtin import tiny_scheduler, tiny_unet
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import adapters_disabled, add_lora, fuse_lora, lora_parameters
from cat_engine.engine.split_batch import adapter_rows


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_by_hand(prediction):
    scheduler = tiny_scheduler(prediction if prediction != "sample" else "epsilon")
    scheduler.register_to_config(prediction_type=prediction)
    gamma = 5.0
    weights = min_snr_weights(scheduler, gamma)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    alpha_bar = torch.cumprod(1 - betas, 0)
    for t in (0, 1, 10, 100, 400, 999):
        snr = float(alpha_bar[t] / (1 - alpha_bar[t]))
        expected = {
            "epsilon": min(snr, gamma) / snr,
            "v_prediction": min(snr, gamma) / (snr + 1),
            "sample": min(snr, gamma),
        }[prediction]
        assert weights[t] == pytest.approx(expected, rel=1e-4), t
    if prediction == "epsilon":
        assert weights[0] < 0.01 and weights[999] == pytest.approx(1.0)  # low noise weighs least


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    unet = add_lora(tiny_unet(), rank=4, seed=0)
    with torch.no_grad():  # a non-zero adapter, so the CAT term and every gradient are non-trivial
        for p in lora_parameters(unet):
            p.normal_(0, 0.05)
    return unet


def _batch(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, 16, 16, generator=g)
    return CatBatch(
        z,
        torch.tensor([5, 400, 900][:b]),
        torch.randn(b, 77, 32, generator=g),
        torch.randn(b, 77, 32, generator=g),
        torch.randn(b, 4, 16, 16, generator=g),
    )


def _grads(unet, loss):
    params = lora_parameters(unet)
    return torch.autograd.grad(loss, params)


def test_row_losses_average_to_cat_loss_on_the_split_batch(unet):
    fuse_lora(unet)
    batch = _batch()
    ldm, cat = row_losses(unet, batch)
    assert ldm.shape == cat.shape == (3,)
    out = batch_loss(unet, batch, cat_weight=0.7)
    torch.testing.assert_close(ldm.mean(), out.ldm)
    torch.testing.assert_close(cat.mean(), out.cat)
    mine = _grads(unet, ldm.mean() + 0.7 * cat.mean())
    params = lora_parameters(unet)
    out = batch_loss(unet, batch, cat_weight=0.7)
    for a, b in zip(mine, torch.autograd.grad(out.loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_min_snr_loss_against_a_per_row_hand_computation_with_the_reference(unet):
    fuse_lora(unet)
    batch = _batch()
    weights = tuple(float(w) for w in torch.linspace(0.1, 1.0, 1000))
    loss, ldm, cat = min_snr_step_loss(0.5, weights)(unet, batch)
    # by hand: each row alone, its three UNet calls written out, its LDM term times w(t)
    total, rows = 0, []
    with adapter_rows(unet, None):
        for i in range(3):
            z, t = batch.noisy_latents[i : i + 1], batch.timesteps[i : i + 1]
            ldm_i = mse(unet_forward(unet, z, t, batch.token_embeds[i : i + 1]), batch.target[i : i + 1])
            plain = unet_forward(unet, z, t, batch.plain_embeds[i : i + 1])
            with torch.no_grad(), adapters_disabled(unet):
                base = unet_forward(unet, z, t, batch.plain_embeds[i : i + 1])
            cat_i = mse(plain, base)
            w = weights[int(t)]
            rows.append((w * ldm_i.detach(), cat_i.detach()))
            total = total + (w * ldm_i + 0.5 * cat_i) / 3
    torch.testing.assert_close(ldm, sum(r[0] for r in rows) / 3)
    torch.testing.assert_close(cat, sum(r[1] for r in rows) / 3)
    torch.testing.assert_close(loss.detach(), total.detach())
    for a, b in zip(_grads(unet, loss), _grads(unet, total)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_unfused_layers_take_the_reference_and_agree(unet):
    from cat_engine.engine.lora import unfuse_lora

    batch = _batch(2)
    fused = [t.detach() for t in row_losses(fuse_lora(unet), batch)]
    reference = [t.detach() for t in row_losses(unfuse_lora(unet), batch)]
    fuse_lora(unet)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_cat_weight_zero_is_one_call_of_weighted_ldm(unet):
    fuse_lora(unet)
    batch = _batch()
    ones = (1.0,) * 1000
    loss, ldm, cat = min_snr_step_loss(0.0, ones)(unet, batch)
    out = batch_loss(unet, batch, cat_weight=0.0)
    torch.testing.assert_close(loss.detach(), out.loss.detach())
    assert cat == 0
