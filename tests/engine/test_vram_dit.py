"""The VRAM planner on diffusion transformers: weights by parameter count and bytes, the memory options
lowering the prediction, the meta measurement against a real run, a plan that fits."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cat_engine.cat.loss import step_loss
from cat_engine.engine import vram
from cat_engine.engine.builtin_dit import tiny_transformer
from cat_engine.engine.dit_configs import DIT_CONFIGS, DIT_VAE_SCALE
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import add_lora, fuse_lora
from cat_engine.engine.memory_plan import MemoryPlan
from cat_engine.engine.offload import offload_blocks
from cat_engine.engine.quantize import QuantizedLinear, quantize_frozen
from cat_engine.engine.unet_configs import resolve_model, spec_from_dit_config
from cat_engine.engine.vram import GiB, best_plan, estimate_peak

CAT = step_loss(1.0)
CKPT = MemoryPlan(precision="bf16", gradient_checkpointing=True)
OFFLOAD = replace(CKPT, offload=True)
INT8 = replace(CKPT, frozen_quant="int8")
INT8_OFFLOAD = replace(INT8, offload=True)
# Flux.1 at full width with 2 double and 4 single blocks: full-size tensors, a short meta step.
SHORT_FLUX = spec_from_dit_config(
    "flux-2+4",
    "flux",
    {**DIT_CONFIGS["flux"][1], "num_layers": 2, "num_single_layers": 4},
    DIT_VAE_SCALE,
    1024,
)
FLUX_PARAMETERS = 11_901_408_320  # the published transformer's (tests/engine/test_dit_configs.py)


def _torchao():
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


needs_torchao = pytest.mark.skipif(not _torchao(), reason="int8 needs torchao")


def _frozen_tensors(model):
    return [t for n, t in (*model.named_parameters(), *model.named_buffers()) if "lora_" not in n]


def test_flux_weights_are_the_parameter_count_times_two_bytes():
    model = vram._meta_lora_unet(resolve_model("flux"), 16)
    weights, lora, offloaded = vram._param_bytes(model, CKPT)
    slack = 512 * len(_frozen_tensors(model))  # allocations are rounded to 512 bytes
    assert 2 * FLUX_PARAMETERS <= weights <= 2 * FLUX_PARAMETERS + slack and offloaded == 0
    # offloading keeps the blocks in CPU memory: the same bytes, nearly all of them off the device
    on_device, _, away = vram._param_bytes(model, OFFLOAD)
    assert on_device + away == weights and away > 0.98 * weights


@needs_torchao
def test_int8_weights_are_one_byte_per_linear_weight_plus_scales():
    model = vram._meta_lora_unet(SHORT_FLUX, 16, True, "int8")
    linears = [m for m in model.modules() if type(m) is QuantizedLinear]
    quantised = sum(m.weight.numel() for m in linears)
    rows = sum(m.weight.shape[0] for m in linears)
    rest = sum(t.numel() for t in _frozen_tensors(model)) - quantised
    weights, _, _ = vram._param_bytes(model, INT8)
    slack = 512 * 3 * len(_frozen_tensors(model))  # values, scales, zero points: one allocation each
    low = quantised + 2 * rest
    assert low <= weights <= low + 5 * rows + slack  # a float32 scale and an int8 zero point per row
    full, _, _ = vram._param_bytes(vram._meta_lora_unet(SHORT_FLUX, 16), CKPT)
    assert weights < 0.52 * full


@needs_torchao
def test_memory_options_lower_the_prediction():
    est = {
        p.describe(): estimate_peak(SHORT_FLUX, 256, 1, p, rank=16, loss_fn=CAT)
        for p in (CKPT, OFFLOAD, INT8, INT8_OFFLOAD)
    }
    ckpt, offload, int8, both = est.values()
    assert offload.total < ckpt.total and int8.total < ckpt.total
    assert both.total < offload.total and both.total < int8.total
    assert offload.offloaded > 0.9 * ckpt.weights and offload.weights < 0.1 * ckpt.weights
    # in flight: the blocks' copies are counted in the step, not in the weights (here: at least one
    # block's bf16 bytes more than the resident plan's step)
    block = max(sum(t.numel() for t in b.parameters() if not t.requires_grad) for b in offload_blocks(
        vram._meta_lora_unet(SHORT_FLUX, 16)))  # fmt: skip
    assert offload.activations + offload.workspace >= ckpt.activations + ckpt.workspace + 2 * block


def test_transformer_candidates_are_checkpointed_after_the_first():
    plans = [p.describe() for p in vram.candidate_plans("bf16", "sdpa", family="flux")]
    assert plans == [
        "bf16 sdpa no-ckpt",
        "bf16 sdpa ckpt",
        "bf16 sdpa ckpt offload",
        "bf16 sdpa ckpt int8",
        "bf16 sdpa ckpt int8 offload",
    ]


def _tiny(family, quant):
    torch.manual_seed(0)
    model = add_lora(tiny_transformer(family), rank=4, targets=DIT_FAMILIES[family].default_targets)
    fuse_lora(model)
    quantize_frozen(model, quant)
    return model


def _cloned_terms(model, batch):
    # A CPU mean keeps its reduction buffer behind the scalar it returns (CUDA's does not); fresh
    # scalars let the CPU run be compared with the meta run, which models CUDA.
    return tuple(t.clone() for t in CAT(model, batch))


@pytest.mark.parametrize("family", ["flux", "zimage"])
@pytest.mark.parametrize("plan", [CKPT, OFFLOAD, INT8], ids=lambda p: p.describe())
def test_meta_measurement_matches_a_real_cpu_run(family, plan):
    """The meta run allocates what a real CPU run (real autocast, real copies) allocates, quantised
    and offloaded included: the mechanism the CUDA estimate uses."""
    if plan.frozen_quant != "none" and not _torchao():
        pytest.skip("int8 needs torchao")
    spec = resolve_model(f"tiny-{family}")
    real = vram.measure_step(
        _tiny(family, plan.frozen_quant), spec, 128, 2, plan, _cloned_terms, device="cpu", device_type="cpu"
    )
    with torch.device("meta"):
        model = _tiny(family, plan.frozen_quant)
    meta = vram.measure_step(model, spec, 128, 2, plan, _cloned_terms, device="meta", device_type="cpu")
    for r, m in zip(real, meta):
        assert m == pytest.approx(r, rel=0.05)


@needs_torchao
def test_best_plan_for_a_transformer_fits_the_budget():
    candidates = dict(
        (p.describe(), est) for p, est in vram.plan_candidates(SHORT_FLUX, 256, 1, rank=16, loss_fn=CAT)
    )
    ckpt, offload = candidates["bf16 sdpa ckpt"], candidates["bf16 sdpa ckpt offload"]
    budget = (ckpt.total + offload.total) // 2 + vram.CUDA_CONTEXT_RESERVE
    plan, est = best_plan(SHORT_FLUX, 256, 1, budget, rank=16, loss_fn=CAT)
    assert plan == OFFLOAD and est.fits(budget)
    both = candidates["bf16 sdpa ckpt int8 offload"]
    budget = (offload.total + both.total) // 2 + vram.CUDA_CONTEXT_RESERVE
    plan, est = best_plan(SHORT_FLUX, 256, 1, budget, rank=16, loss_fn=CAT)
    assert plan == INT8_OFFLOAD and est.fits(budget)


@pytest.mark.slow
@needs_torchao
@pytest.mark.parametrize("name", ["flux", "sd35-large", "sd35-medium", "zimage"])
def test_full_size_transformers_fit_12gb_at_1024px(name):
    plan, est = best_plan(name, 1024, 1, 12 * GiB, rank=16, loss_fn=CAT)
    assert est.fits(12 * GiB) and plan.gradient_checkpointing
