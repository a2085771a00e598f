"""fuse_lora on a tiny diffusers UNet: same outputs and LoRA gradients as peft, split batches,
disabled adapters, saving, unfusing, gradient checkpointing, dropout."""

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from cat_engine.engine import adapter_rows, add_lora, fuse_lora, lora_parameters, unfuse_lora
from cat_engine.engine.fused_lora import FusedLoraLinear, fused_layers
from cat_engine.engine.lora import (
    DEFAULT_TARGETS,
    FEED_FORWARD_TARGETS,
    adapters_disabled,
    lora_state_dict,
    perturb_lora_b,
    save_lora,
)

REL = 1e-4  # float32: max error over max |reference|; the fused op only reorders sums


def close(got, want, rel=REL):
    err = (got - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), (
        f"max error {err:.3g} vs max |want| {want.abs().max().item():.3g}"
    )


def tiny_unet(seed=0):
    from cat_engine.engine import builtin

    torch.manual_seed(seed)
    return builtin.tiny_unet("sd", sample_size=8)


def lora_unet(rank=4, alpha=8.0, targets=DEFAULT_TARGETS + FEED_FORWARD_TARGETS, seed=0):
    unet = add_lora(tiny_unet(seed), rank=rank, alpha=alpha, targets=targets, seed=seed)
    perturb_lora_b(unet, 0.2)  # peft starts B at zero: make the delta show
    return unet


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 500, 999][:batch]),
        torch.randn(batch, 5, 32, generator=g),
    )


def run(unet, sample, t, ctx, grad=True):
    """Output and the LoRA gradients of a fixed loss (in module order)."""
    for p in lora_parameters(unet):
        p.grad = None
    out = unet(sample, t, ctx).sample
    if not grad:
        return out.detach(), []
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in lora_parameters(unet)
    ]


def assert_all_close(a, b, rel=REL):
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        close(x, y, rel)


def count_op_calls(monkeypatch):
    """Count calls of the fused op from the layers: equal outputs alone would not show that the
    layers ran it rather than falling back to peft's forward."""
    import cat_engine.engine.fused_lora as fl

    calls = []
    real = fl.lora_linear
    monkeypatch.setattr(fl, "lora_linear", lambda *a, **k: calls.append(a[6]) or real(*a, **k))
    return calls


def test_fused_unet_matches_peft_outputs_and_lora_grads(monkeypatch):
    calls = count_op_calls(monkeypatch)
    peft_unet = lora_unet()
    fused = fuse_lora(copy.deepcopy(peft_unet))
    names = fused_layers(fused)
    assert len(names) == sum(type(m) is PeftLoraLinear for m in peft_unet.modules()) > 0
    assert any(n.endswith("ff.net.2") for n in names) and any(n.endswith("to_out.0") for n in names)
    out_p, grads_p = run(peft_unet, *inputs())
    out_f, grads_f = run(fused, *inputs())
    assert len(calls) == len(names) and set(calls) == {None}  # every layer once, all rows
    close(out_f, out_p)
    assert_all_close(grads_f, grads_p)
    assert max(g.abs().max() for g in grads_f) > 0


def test_split_rows_are_adapter_then_base():
    """Rows < k get peft's adapter model, rows >= k the base model; LoRA grads only from rows < k."""
    peft_unet = lora_unet()
    fused = fuse_lora(copy.deepcopy(peft_unet))
    sample, t, ctx = inputs(3)
    with adapter_rows(fused, 2):
        out, _ = run(fused, sample, t, ctx, grad=False)
        for p in lora_parameters(fused):
            p.grad = None
        fused(sample, t, ctx).sample[2:].sum().backward()  # a loss on the base row only
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in lora_parameters(fused))
    ada, _ = run(peft_unet, sample[:2], t[:2], ctx[:2], grad=False)
    with adapters_disabled(peft_unet):
        base, _ = run(peft_unet, sample[2:], t[2:], ctx[2:], grad=False)
    close(out[:2], ada)
    close(out[2:], base)
    with adapters_disabled(peft_unet):
        base_of_adapter_rows, _ = run(peft_unet, sample[:2], t[:2], ctx[:2], grad=False)
    assert (ada - base_of_adapter_rows).abs().max() > 1e-3  # the split is visible


def test_adapters_disabled_gives_base_model_on_fused_unet():
    unet = lora_unet()
    base = tiny_unet()  # same seed: the same frozen weights, no adapter
    fuse_lora(unet)
    sample, t, ctx = inputs()
    with torch.no_grad(), adapters_disabled(unet):
        got = unet(sample, t, ctx).sample
    with torch.no_grad():
        want = base(sample, t, ctx).sample
        adapted = unet(sample, t, ctx).sample
    close(got, want)
    assert (adapted - want).abs().max() > 1e-3  # the adapter is back on after the block
    assert all(p.requires_grad for p in lora_parameters(unet))


def test_same_parameters_optimizer_state_dict_and_unfuse(tmp_path):
    unet = lora_unet()
    params = lora_parameters(unet)
    opt = torch.optim.SGD(params, lr=0.1)
    keys_before = lora_state_dict(unet)
    assert fuse_lora(unet) is unet
    assert fuse_lora(unet) is unet  # twice is harmless
    assert [id(p) for p in lora_parameters(unet)] == [id(p) for p in params]
    after = lora_state_dict(unet)
    assert list(after) == list(keys_before)
    for k in after:
        torch.testing.assert_close(after[k], keys_before[k], rtol=0, atol=0)
    assert save_lora(unet, tmp_path).exists()

    sample, t, ctx = inputs()
    unet(sample, t, ctx).sample.square().mean().backward()
    old = [p.detach().clone() for p in params]
    opt.step()
    assert any((p - o).abs().max() > 0 for p, o in zip(params, old))  # the old optimizer moved them
    with torch.no_grad():
        fused_out = unet(sample, t, ctx).sample
    assert unfuse_lora(unet) is unet
    assert not fused_layers(unet) and any(type(m) is PeftLoraLinear for m in unet.modules())
    with torch.no_grad():
        close(unet(sample, t, ctx).sample, fused_out)


def test_fuse_lora_without_adapter_raises():
    with pytest.raises(ValueError, match="no LoRA adapter"):
        fuse_lora(tiny_unet())


def test_gradient_checkpointing_with_split_rows():
    peft_unet = lora_unet()
    fused = fuse_lora(copy.deepcopy(peft_unet))
    fused.enable_gradient_checkpointing()
    fused.train()
    peft_unet.train()
    sample, t, ctx = inputs(3)
    with adapter_rows(fused, 2):  # backward inside: the recomputation reads the same rows
        out, grads = run(fused, sample, t, ctx)
    for p in lora_parameters(peft_unet):
        p.grad = None
    ada = peft_unet(sample[:2], t[:2], ctx[:2]).sample
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (ada * weights[:2]).sum().backward()  # base rows carry no LoRA gradient
    assert_all_close(grads, [p.grad for p in lora_parameters(peft_unet)])
    close(out[:2], ada.detach())


def test_dropout_and_scaling_follow_peft():
    unet = tiny_unet()
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=3,
            lora_alpha=7.0,
            lora_dropout=0.3,
            init_lora_weights="gaussian",
            target_modules=list(DEFAULT_TARGETS),
        )
    )
    perturb_lora_b(unet, 0.2)  # peft starts B at zero: make the delta show
    unet.train()
    fused = fuse_lora(copy.deepcopy(unet))
    layer = next(m for m in fused.modules() if type(m) is FusedLoraLinear)
    assert layer.scaling["default"] == pytest.approx(7.0 / 3)
    results = []
    for model in (unet, fused):
        torch.manual_seed(11)  # same dropout masks: both draw them in the same order and shapes
        results.append(run(model, *inputs()))
    close(results[1][0], results[0][0])
    # A scale of 7/3 applied at another point of the sums (alpha of addmm_ vs peft's multiply)
    # rounds differently; in float64 the two agree to 1e-12. A wrong mask would be off by O(1).
    assert_all_close(results[1][1], results[0][1], rel=5e-4)
    torch.manual_seed(12)
    other, _ = run(fused, *inputs(), grad=False)
    assert (other - results[1][0]).abs().max() > 1e-4  # dropout is really on


def test_fused_unet_through_triton_kernels(monkeypatch):
    """The same equivalence with every LoRA linear on the Triton path (interpreter on CPU)."""
    monkeypatch.setenv("CAT_ENGINE_LORA_PATH", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # kernels are jitted per setting at first launch
    import importlib

    ll = importlib.import_module("cat_engine.kernels.lora_linear")  # the package exports the function
    # Poison the torch path: any layer that silently used it would break the comparison.
    monkeypatch.setattr(ll, "TorchLoraLinear", None)
    calls = count_op_calls(monkeypatch)
    peft_unet = lora_unet(targets=DEFAULT_TARGETS)
    fused = fuse_lora(copy.deepcopy(peft_unet))
    sample, t, ctx = inputs(2)
    with adapter_rows(fused, 1):
        out, grads = run(fused, sample, t, ctx)
    assert len(calls) == len(fused_layers(fused)) and set(calls) == {1}
    for p in lora_parameters(peft_unet):
        p.grad = None
    ada = peft_unet(sample[:1], t[:1], ctx[:1]).sample
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (ada * weights[:1]).sum().backward()
    close(out[:1], ada.detach())
    assert_all_close(grads, [p.grad for p in lora_parameters(peft_unet)])
    with adapters_disabled(peft_unet), torch.no_grad():
        base = peft_unet(sample[1:], t[1:], ctx[1:]).sample
    close(out[1:], base)


def test_fallback_to_peft_inside_a_split_batch_is_refused_not_silent():
    """peft's forward would put the delta on base rows too: a split batch must refuse it."""
    import pytest

    from cat_engine.engine.builtin import tiny_unet
    from cat_engine.engine.lora import adapters_disabled, add_lora, fuse_lora
    from cat_engine.engine.split_batch import adapter_rows

    unet = fuse_lora(add_lora(tiny_unet("sd"), rank=4, seed=0))
    layer = next(m for m in unet.modules() if type(m).__name__ == "FusedLoraLinear")
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64)  # weight is fp32: falls back
    with adapter_rows(unet, 1), pytest.raises(RuntimeError, match="cannot run a split batch"):
        layer(x)
    layer(x.float())  # fusable: fine
    with adapter_rows(unet, None):
        with pytest.raises(RuntimeError):  # peft itself refuses the dtype mismatch
            layer(x)
    with adapters_disabled(unet):  # base everywhere: the fallback is right there
        layer(x.float())


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_the_layer_route_follows_peft_state_changes(monkeypatch):
    """The fused layer keeps its route (fusable? which adapter?) between calls; every peft state
    change must reach it: a second adapter, set_adapter, merge/unmerge, disable, delete."""
    from peft import inject_adapter_in_model

    from cat_engine.engine.split_batch import SplitBatchState

    calls = count_op_calls(monkeypatch)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.to_q(x)

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), One())
    from cat_engine.engine.fused_lora import fuse_lora_layers

    fuse_lora_layers(model, SplitBatchState())
    layer = model.to_q
    x = torch.randn(3, 4, 8)

    def expected(name):
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        base = layer.base_layer(x)
        return base + layer.scaling[name] * (x @ a.t() @ b.t())

    with torch.no_grad():
        for p in layer.lora_B["default"].parameters():
            p.normal_()
        close(model(x), expected("default"))
        assert len(calls) == 1
        inject_adapter_in_model(
            LoraConfig(r=3, lora_alpha=6, target_modules=["to_q"]), model, adapter_name="other"
        )
        assert type(layer) is FusedLoraLinear
        for p in layer.lora_B["other"].parameters():
            p.normal_()
        layer.set_adapter("other")
        want = expected("other")
        close(model(x), want)
        assert len(calls) == 2
        layer.merge()  # merged: peft's forward (the base weight carries the delta)
        close(model(x), want)
        assert len(calls) == 2
        layer.unmerge()
        close(model(x), expected("other"))
        layer.enable_adapters(False)
        close(model(x), layer.base_layer(x))
        layer.enable_adapters(True)
        layer.set_adapter("default")
        layer.delete_adapter("other")
        close(model(x), expected("default"))
        assert len(calls) == 4


def test_a_bad_lora_path_setting_stops_fusing_with_a_one_line_error(monkeypatch):
    from cat_engine.engine.errors import CatEngineError

    monkeypatch.setenv("CAT_ENGINE_LORA_PATH", "cuda")
    with pytest.raises(CatEngineError, match="CAT_ENGINE_LORA_PATH='cuda': expected auto, torch or triton"):
        fuse_lora(lora_unet())
