"""Memory plan: attention backends, precision and casts, optimizer, compile with a gradient check."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from cat_engine.engine import memory_plan as mp
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters, perturb_lora_b
from cat_engine.engine.memory_plan import (
    MemoryPlan,
    MemoryPlanError,
    apply_memory_plan,
    cast_frozen_weights,
    compile_unet,
    compiled_modules,
    lora_gradients,
    make_grad_scaler,
    make_optimizer,
    max_relative_error,
    resolve_precision,
    set_attention,
)


def lora_unet(seed: int = 0):
    """Tiny UNet with a rank-4 LoRA whose B is non-zero, so every LoRA gradient is non-trivial."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = add_lora(tiny_unet(), rank=4, seed=seed)
        perturb_lora_b(unet, 0.02)  # peft starts B at zero: make the delta show
    return unet


def inputs(batch: int = 1, seed: int = 0) -> CatBatch:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=gen)
    text = torch.randn(batch, 77, 32, generator=gen)
    return CatBatch(latents, torch.full((batch,), 500), text, text * 0.5, torch.randn_like(latents))


def call(unet, x: CatBatch):
    """The UNet on the batch's token rows: what compile_unet's gradient check runs."""
    return unet_forward(unet, x.noisy_latents, x.timesteps, x.token_embeds, x.added_cond_kwargs)


# --- attention ---------------------------------------------------------------------------------


def test_attention_backends_give_equal_outputs_and_gradients():
    unet, x = lora_unet(), inputs(batch=2)
    params = lora_parameters(unet)
    results = {}
    for backend in ("sdpa", "math"):
        set_attention(unet, backend)
        with torch.no_grad():
            out = call(unet, x)
        results[backend] = (out, lora_gradients(lambda: call(unet, x), params))
    (out_a, g_a), (out_b, g_b) = results["sdpa"], results["math"]
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert max_relative_error(g_a, g_b) < 1e-4


def test_attention_processors_are_set():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = lora_unet()
    set_attention(unet, "math")
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    set_attention(unet, "sdpa")
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_xformers_missing_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # import now raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(MemoryPlanError, match="xformers is not installed.*--attention sdpa"):
        set_attention(lora_unet(), "xformers")


def test_xformers_that_computes_wrong_is_refused(monkeypatch):
    import types

    fake = types.ModuleType("xformers.ops")
    fake.memory_efficient_attention = lambda q, k, v: torch.zeros_like(q)
    pkg = types.ModuleType("xformers")
    pkg.ops = fake
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    with pytest.raises(MemoryPlanError, match="wrong attention"):
        set_attention(lora_unet(), "xformers")


def test_unknown_backend_and_precision_are_refused():
    with pytest.raises(MemoryPlanError, match="attention must be one of"):
        MemoryPlan(attention="flash")
    with pytest.raises(MemoryPlanError, match="precision must be one of"):
        MemoryPlan(precision="int8")


# --- precision ---------------------------------------------------------------------------------


def test_resolve_precision_on_cpu():
    assert resolve_precision(MemoryPlan(), "cpu").name == "fp32"
    assert resolve_precision(MemoryPlan(precision="auto"), "cpu").name == "fp32"
    with pytest.warns(UserWarning, match="slower than fp32"):
        p = resolve_precision(MemoryPlan(precision="bf16"), "cpu")
    assert (p.compute_dtype, p.frozen_dtype, p.loss_scaling) == (torch.bfloat16, torch.bfloat16, False)
    with pytest.raises(MemoryPlanError, match="fp16 training needs a CUDA device"):
        resolve_precision(MemoryPlan(precision="fp16"), "cpu")


def test_resolve_precision_on_cuda_without_bf16_uses_fp16_with_loss_scaling(monkeypatch):
    monkeypatch.setattr(mp, "_cuda_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="no bf16 support"):
        p = resolve_precision(MemoryPlan(precision="bf16"), "cuda")
    assert (p.name, p.compute_dtype, p.loss_scaling) == ("fp16", torch.float16, True)
    assert resolve_precision(MemoryPlan(precision="auto"), "cuda").name == "fp16"
    monkeypatch.setattr(mp, "_cuda_bf16_supported", lambda: True)
    assert resolve_precision(MemoryPlan(precision="auto"), "cuda").name == "bf16"


def test_grad_scaler_is_created():
    scaler = make_grad_scaler("cpu")
    assert hasattr(scaler, "scale") and hasattr(scaler, "step") and hasattr(scaler, "update")


def test_frozen_weights_half_lora_fp32_and_mixed_dtypes_train_under_autocast():
    unet, x = lora_unet(), inputs()
    reference = lora_gradients(lambda: call(unet, x), lora_parameters(unet))
    ids = [id(p) for p in lora_parameters(unet)]
    cast_frozen_weights(unet, torch.bfloat16)
    # Normalisation layers keep fp32 scales and shifts (a norm may see an fp32 input before autocast acts).
    norms = {
        id(p)
        for m in unet.modules()
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))
        for p in m.parameters()
    }
    assert norms
    for name, p in unet.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name or id(p) in norms else torch.bfloat16), name
    assert [id(p) for p in lora_parameters(unet)] == ids  # same Parameter objects: optimizers stay valid
    with pytest.warns(UserWarning, match="bf16 on CPU"):
        autocast = mp.autocast_factory(resolve_precision(MemoryPlan(precision="bf16"), "cpu"), "cpu")
    with autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    grads = lora_gradients(lambda: call(unet, x), lora_parameters(unet), autocast)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # bf16 rounds frozen weights and activations (8-bit mantissa): close to fp32, not equal.
    assert max_relative_error(grads, reference) < 0.1


def _bf16_plan_step(fused: bool):
    from cat_engine.cat.loss import cat_loss

    unet, x = lora_unet(), inputs(batch=1)
    if fused:  # cat_loss takes the split-batch path, as training does
        fuse_lora(unet)
    with pytest.warns(UserWarning, match="bf16 on CPU"):
        ctx = apply_memory_plan(
            unet, MemoryPlan(precision="bf16", gradient_checkpointing=True, channels_last=True), "cpu"
        )
    assert ctx.precision.name == "bf16" and ctx.dtype == torch.bfloat16 and ctx.scaler is None
    assert ctx.plan.fused_adamw is False  # auto: fused only on CUDA
    assert unet.is_gradient_checkpointing
    assert unet.conv_in.weight.dtype == torch.bfloat16
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    unet.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cat_loss's "not fused" notice on the reference path
        with ctx.autocast():
            out = cat_loss(ctx.unet, x.noisy_latents, x.timesteps, x.token_embeds, x.plain_embeds, x.target)
    out.loss.backward()  # outside autocast, as a training loop does
    grads = [p.grad for p in lora_parameters(unet)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_apply_memory_plan_bf16_checkpointing_channels_last():
    _bf16_plan_step(fused=False)


def test_apply_memory_plan_bf16_fused_split_batch():
    _bf16_plan_step(fused=True)


def test_apply_memory_plan_compile_needs_check_inputs():
    with pytest.raises(MemoryPlanError, match="check_inputs"):
        apply_memory_plan(lora_unet(), MemoryPlan(compile=True), "cpu")


# --- optimizer ---------------------------------------------------------------------------------


def test_make_optimizer_fused_when_asked_and_supported():
    params = lora_parameters(lora_unet())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = make_optimizer(params, 1e-3, MemoryPlan(fused_adamw=True), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    # torch >= 2.4 has a fused CPU AdamW; a torch without one must say so, not silently ignore it
    assert opt.defaults.get("fused") is True or any(
        "fused AdamW unavailable" in str(w.message) for w in caught
    )
    plain = make_optimizer(params, 1e-3, MemoryPlan(), "cpu")  # auto: not fused on CPU
    assert not plain.defaults.get("fused")
    assert plain.defaults["lr"] == 1e-3


def test_make_optimizer_falls_back_when_fused_is_refused(monkeypatch):
    class NoFusedAdamW(torch.optim.AdamW):  # a torch/device whose AdamW refuses fused=True
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be on a supported device")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedAdamW)
    with pytest.warns(UserWarning, match="fused AdamW unavailable.*supported device"):
        opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3, MemoryPlan(fused_adamw=True), "cpu")
    assert isinstance(opt, NoFusedAdamW) and not opt.defaults.get("fused")


def test_fused_optimizer_steps_like_the_default_one():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 4))
    b = torch.nn.Parameter(a.detach().clone())
    fused = make_optimizer([a], 1e-2, MemoryPlan(fused_adamw=True), "cpu")
    plain = make_optimizer([b], 1e-2, MemoryPlan(fused_adamw=False), "cpu")
    for _ in range(3):
        for p, opt in ((a, fused), (b, plain)):
            p.grad = torch.sin(p.detach() * 3)
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- compile gradient check --------------------------------------------------------------------


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times 1.01 in backward: a compiler that got backward wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def test_max_relative_error_detects_a_wrong_gradient():
    unet, x = lora_unet(), inputs()
    params = lora_parameters(unet)
    eager = lora_gradients(lambda: call(unet, x), params)
    again = lora_gradients(lambda: call(unet, x), params)
    wrong = lora_gradients(lambda: _ScaleGrad.apply(call(unet, x)), params)
    assert max_relative_error(again, eager) < 1e-6
    assert max_relative_error(wrong, eager) == pytest.approx(0.01, rel=1e-3)
    assert max_relative_error([torch.zeros(3), torch.ones(3)], [torch.zeros(3), torch.ones(3)]) == 0
    # a non-zero gradient where the reference is zero counts against the largest reference norm
    assert max_relative_error([torch.ones(3), torch.ones(3)], [torch.zeros(3), torch.ones(3)]) > 100


def test_compile_falls_back_loudly_on_wrong_gradients(monkeypatch, capsys):
    def bad_compile(modules, **kwargs):
        for m in modules:
            m._compiled_call_impl = lambda *a, _m=m, **k: (_ScaleGrad.apply(_m._call_impl(*a, **k)[0]),)

    monkeypatch.setattr(mp, "_compile_in_place", bad_compile)
    unet, x = lora_unet(), inputs()
    with pytest.warns(UserWarning, match=r"torch.compile gave wrong LoRA gradients .*max rel err 0\.01"):
        out = compile_unet(unet, MemoryPlan(compile=True), x)
    assert out is unet and compiled_modules(unet) == []
    assert "falling back to eager" in capsys.readouterr().out


def test_compile_keeps_a_correct_compilation(monkeypatch):
    def identity_compile(modules, **kwargs):
        for m in modules:
            m._compiled_call_impl = m._call_impl

    monkeypatch.setattr(mp, "_compile_in_place", identity_compile)
    unet = lora_unet()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_unet(unet, MemoryPlan(compile=True), inputs())
    assert compiled_modules(unet) == [unet]


@pytest.mark.parametrize(
    "mode, backend, passed, runs",
    [
        ("default", "inductor", None, 1),
        ("reduce-overhead", "inductor", "reduce-overhead", 3),  # recorded, then replayed: all checked
        ("max-autotune", "inductor", "max-autotune", 3),
        ("max-autotune", "aot_eager", None, 3),  # modes are inductor's; the other backends take none
    ],
)
def test_compile_modes_reach_torch_compile_and_graph_modes_are_checked_on_replays(
    monkeypatch, mode, backend, passed, runs
):
    seen, checks = {}, []

    def record_compile(modules, **kwargs):
        seen.update(kwargs)
        for m in modules:
            m._compiled_call_impl = m._call_impl

    real = mp.lora_gradients
    monkeypatch.setattr(mp, "_compile_in_place", record_compile)
    monkeypatch.setattr(mp, "lora_gradients", lambda *a, **k: checks.append(1) or real(*a, **k))
    unet = lora_unet()
    plan = MemoryPlan(compile=mode)
    assert plan.compile == mode and MemoryPlan(compile=True).compile == "default"
    compile_unet(unet, plan, inputs(), backend=backend)
    assert seen.get("mode") == passed and seen["backend"] == backend
    assert len(checks) == 1 + runs  # eager once, compiled once per run
    assert compiled_modules(unet) == [unet]
    assert ("compile" if mode == "default" else f"compile {mode}") in plan.describe()


def test_compile_mode_must_be_known():
    with pytest.raises(
        MemoryPlanError, match="compile must be one of default, reduce-overhead, max-autotune"
    ):
        MemoryPlan(compile="fastest")
    assert MemoryPlan(compile=None).compile is False and MemoryPlan(compile="false").compile is False


def test_compile_check_restores_zero_lora_b_and_grads():
    unet = add_lora(tiny_unet(), rank=4, seed=0)  # peft init: B == 0
    seen = []

    def spy(call_, params, autocast=None):
        seen.append(all(p.any() for n, p in unet.named_parameters() if "lora_B" in n))
        return [torch.zeros_like(p) for p in params]

    import unittest.mock

    with (
        unittest.mock.patch.object(mp, "lora_gradients", spy),
        unittest.mock.patch.object(mp, "_compile_in_place", lambda modules, **k: None),
    ):
        compile_unet(unet, MemoryPlan(compile=True), inputs())
    assert seen == [True, True]  # the check ran with non-zero B
    assert not any(p.any() for n, p in unet.named_parameters() if "lora_B" in n)  # and put B back
    assert all(p.grad is None for p in lora_parameters(unet))


def test_compile_failure_falls_back(monkeypatch):
    def broken(modules, **kwargs):
        for m in modules:
            m._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no C compiler"))

    monkeypatch.setattr(mp, "_compile_in_place", broken)
    unet = lora_unet()
    with pytest.warns(UserWarning, match="torch.compile failed.*no C compiler"):
        compile_unet(unet, MemoryPlan(compile=True), inputs())
    assert compiled_modules(unet) == []


@pytest.mark.slow
def test_real_compile_aot_eager_matches_eager():
    """aot_eager traces forward and backward with AOTAutograd, without inductor's codegen (~35 s)."""
    torch._dynamo.reset()
    unet, x = lora_unet(), inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_unet(unet, MemoryPlan(compile=True), x, backend="aot_eager")
    assert compiled_modules(unet) == [unet]
    torch._dynamo.reset()


@pytest.mark.slow
def test_real_inductor_compile_never_trains_with_wrong_gradients():
    """Whatever inductor does on this torch/device, the module compile_unet returns has eager's
    gradients: either inductor got them right, or compile_unet fell back (torch 2.13 on CPU:
    max rel err 1.0 measured, so it falls back). ~2 min on 2 busy cores."""
    torch._dynamo.reset()
    unet, x = lora_unet(), inputs()
    params = lora_parameters(unet)
    eager = lora_gradients(lambda: call(unet, x), params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compile_unet(unet, MemoryPlan(compile=True), x, backend="inductor")
    assert max_relative_error(lora_gradients(lambda: call(out, x), params), eager) < 1e-3
    torch._dynamo.reset()
