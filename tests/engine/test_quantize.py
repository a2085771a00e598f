"""Frozen weights in 8 bits (engine/quantize.py): the quantised Linear, the fused LoRA layer on it, the
CAT loss within the quantisation's own error, gradients to LoRA only, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from cat_engine.cat.loss import batch_loss, batch_loss_reference
from cat_engine.engine import quantize
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import adapters_disabled, lora_parameters
from cat_engine.engine.memory_plan import (
    MemoryPlan,
    apply_memory_plan,
    cast_frozen_weights,
    max_relative_error,
)
from cat_engine.engine.quantize import (
    QuantizationError,
    QuantizedLinear,
    dequantize,
    is_quantized,
    quantize_frozen,
)

pytest.importorskip("torchao", reason="the quantised base needs torchao (pip install 'cat-engine[quant]')")

FAMILIES = list(DIT_FAMILIES)
TOKENS = 7


def _linear(mode="int8", bias=True):
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 24, bias=bias).requires_grad_(False)
    quantised = copy.deepcopy(plain)
    holder = torch.nn.Sequential(quantised)
    assert quantize_frozen(holder, mode) == 1
    return plain, holder[0]


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantized_linear_is_the_dequantized_product(mode):
    plain, q = _linear(mode)
    assert type(q) is QuantizedLinear and is_quantized(q.weight) and not q.weight.requires_grad
    w = dequantize(q.weight, torch.float32)
    # our dequantisation is torchao's own
    torch.testing.assert_close(w, q.weight.dequantize(torch.float32), rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, plain.bias))
    # the gradient reaches x through the dequantised weight; the weight gets none
    dy = torch.randn(3, 5, 24)
    y.backward(dy)
    torch.testing.assert_close(x.grad, dy @ w)
    assert q.weight.grad is None
    # the quantisation's error is what 8 bits give: small, not zero
    err = ((w - plain.weight).norm() / plain.weight.norm()).item()
    assert 0 < err < (0.01 if mode == "int8" else 0.05)


def test_quantized_linear_saves_nothing_for_backward():
    """torchao's own linear keeps a dequantised copy of the weight for backward; ours keeps nothing."""
    _, q = _linear()
    saved = []
    x = torch.randn(4, 48, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(x).sum().backward()
    assert saved == []


def test_quantized_linear_under_autocast_runs_in_the_autocast_dtype():
    _, q = _linear()
    cast_frozen_weights(torch.nn.Sequential(q), torch.bfloat16)  # the bias; the quantised weight stays
    assert is_quantized(q.weight) and q.bias.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(torch.randn(4, 48))
    assert y.dtype == torch.bfloat16


LORA_STD = 0.3  # lora_B's spread: a delta that moves the output a lot, so a lost delta shows


def _batch(model, family):
    return DIT_FAMILIES[family].example_batch(
        model.config, 2, 16, TOKENS, generator=torch.Generator().manual_seed(2)
    )


def _step(model, batch, checkpointing=True):
    if checkpointing:
        model.enable_gradient_checkpointing()
    for p in lora_parameters(model):
        p.grad = None
    out = batch_loss(model, batch, 1.0)
    out.loss.backward()
    return out, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in lora_parameters(model)]


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def _quantization_error(make, family, mode):
    """The quantisation's own error: the relative error of the base model's output (no adapter)."""
    full, quantised = make(family, lora_std=LORA_STD), make(family, mode, lora_std=LORA_STD)
    batch = _batch(full, family)
    outs = []
    for model in (full, quantised):
        with torch.no_grad(), adapters_disabled(model):
            outs.append(
                unet_forward(
                    model, batch.noisy_latents, batch.timesteps, batch.token_embeds, batch.added_cond_kwargs
                )
            )
    return _relative(outs[1], outs[0])


BOUND = 4  # the loss terms may move by this multiple of the base output's relative error


def _within_quantization_error(make, family, mode):
    eps = _quantization_error(make, family, mode)
    full, quantised = make(family, lora_std=LORA_STD), make(family, mode, lora_std=LORA_STD)
    batch = _batch(full, family)
    ref, ref_grads = _step(full, batch)
    got, grads = _step(quantised, batch)
    # The CAT term is the adapter's own effect (adapter rows against base rows): it moves by the
    # quantisation's relative error, not more. Dropping the delta, or giving the base rows the delta
    # too, would zero it; the LDM term would move by the delta's effect.
    return (
        eps,
        abs(got.cat - ref.cat).item() / ref.cat.item(),
        abs(got.ldm - ref.ldm).item() / ref.ldm.item(),
        grads,
        ref_grads,
        quantised,
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_cat_loss_is_within_the_quantizations_own_error(family, mode, lora_transformer):
    eps, cat_err, ldm_err, grads, ref_grads, quantised = _within_quantization_error(
        lora_transformer, family, mode
    )
    assert 0 < eps < (0.02 if mode == "int8" else 0.1)
    assert cat_err <= BOUND * eps and ldm_err <= BOUND * eps, (eps, cat_err, ldm_err)
    # gradients reach the LoRA weights only, and point where the full-precision ones point
    assert all(p.grad is None for n, p in quantised.named_parameters() if "lora_" not in n)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                   torch.cat([g.flatten() for g in ref_grads]), dim=0)  # fmt: skip
    assert cosine > 0.99


_ORIGINAL = quantize.lora_on_quantized_base


@pytest.mark.parametrize(
    "broken",
    [
        lambda layer, x, rows: layer.get_base_layer()(x),  # the delta dropped
        lambda layer, x, rows: _ORIGINAL(layer, x, None),  # the delta on the base rows too
    ],
    ids=["delta-dropped", "delta-on-base-rows"],
)
def test_the_bound_fails_when_the_delta_goes_wrong(monkeypatch, broken, lora_transformer):
    monkeypatch.setattr("cat_engine.engine.fused_lora.lora_on_quantized_base", broken)
    eps, cat_err, ldm_err, *_ = _within_quantization_error(lora_transformer, "flux", "int8")
    assert cat_err > BOUND * eps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_split_batch_on_a_quantised_base_equals_the_three_call_reference(
    family, checkpointing, lora_transformer
):
    """The split batch's rows on the quantised base are the quantised model's three calls."""
    model = lora_transformer(family, "int8", lora_std=0.05)
    batch = _batch(model, family)
    split, split_grads = _step(model, batch, checkpointing)
    for p in lora_parameters(model):
        p.grad = None
    ref = batch_loss_reference(model, batch, 1.0)
    ref.loss.backward()
    assert split.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)
    assert max_relative_error(split_grads, [p.grad for p in lora_parameters(model)]) < 1e-4


def test_quantize_frozen_leaves_lora_and_trainable_layers_alone(lora_transformer):
    model = lora_transformer("sd3", "int8")
    quantised = [n for n, m in model.named_modules() if type(m) is QuantizedLinear]
    assert quantised and not any("lora_" in n for n in quantised)
    assert all(p.dtype == torch.float32 and not is_quantized(p) for p in lora_parameters(model))
    # every frozen Linear went: none is left plain outside LoRA
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n]


def test_apply_memory_plan_quantises_then_casts(lora_transformer):
    model = lora_transformer("flux")
    ctx = apply_memory_plan(model, MemoryPlan(precision="bf16", frozen_quant="int8"), "cpu")
    assert ctx.plan.frozen_quant == "int8"
    linears = [m for m in model.modules() if type(m) is QuantizedLinear]
    assert linears and all(is_quantized(m.weight) for m in linears)
    assert all(m.bias is None or m.bias.dtype == torch.bfloat16 for m in linears)
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))


def test_refusals_are_one_line(monkeypatch, lora_transformer):
    with pytest.raises(QuantizationError, match="fp8 needs a CUDA GPU"):
        apply_memory_plan(lora_transformer("sd3"), MemoryPlan(frozen_quant="fp8"), "cpu")

    def missing():
        raise QuantizationError(
            f"--frozen-quant needs torchao (ImportError: no torchao); {quantize.INSTALL_HINT}"
        )

    monkeypatch.setattr(quantize, "_torchao", missing)
    with pytest.raises(QuantizationError, match=r"needs torchao .*pip install 'cat-engine\[quant\]'"):
        apply_memory_plan(lora_transformer("sd3"), MemoryPlan(frozen_quant="int8"), "cpu")
    with pytest.raises(Exception, match="frozen_quant must be one of none, int8, fp8"):
        MemoryPlan(frozen_quant="int4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantised_cat_step_on_cuda(mode, lora_transformer):
    if mode == "fp8" and quantize.fp8_problem("cuda") is not None:
        pytest.skip(quantize.fp8_problem("cuda"))
    full, quantised = lora_transformer("flux"), lora_transformer("flux")
    apply_memory_plan(full, MemoryPlan(precision="bf16", gradient_checkpointing=True), "cuda")
    apply_memory_plan(
        quantised, MemoryPlan(precision="bf16", gradient_checkpointing=True, frozen_quant=mode), "cuda"
    )
    batch = _batch(full, "flux").to("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, _ = _step(full, batch)
        got, grads = _step(quantised, batch)
    assert abs(got.cat - ref.cat).item() / ref.cat.item() < 0.1
    assert all(torch.isfinite(g).all() for g in grads)
