"""What the CAT step costs, counted (CPU, deterministic): FLOPs and bytes saved for backward.

Bounds (issue 4, part 5), on the SD-shaped tiny and small UNets, with and without checkpointing:
    FLOPs(CAT step)       <= (FLOPs(LoRA step on the 2B adapter rows) + FLOPs(no-grad forward, B rows)) * 1.03
    saved bytes(CAT step) <= saved bytes(LoRA step on the 2B adapter rows) * 1.05
The LoRA step is the engine's (fused layers), checkpointed with diffusers' default (torch,
non-reentrant) when checkpointing is on; saved bytes count the inputs that checkpoint keeps too
(``engine/step_accounting.py``).
"""

from __future__ import annotations

import pytest
import torch

from cat_engine.bench.split_overhead import accounting, make_case
from cat_engine.engine.step_accounting import SavedBytes, saved_bytes, step_flops

FLOPS_SLACK = 1.03
SAVED_SLACK = 1.05

CASES = [
    ("tiny", None, 1),
    ("tiny", None, 2),
    ("small", 16, 1),  # the small UNet at 128 px: the same layout, a quarter of the pixels
    ("tiny-xl", None, 1),
]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize(("model", "latent", "batch"), CASES, ids=[f"{m}-b{b}" for m, _, b in CASES])
def test_cat_step_costs_at_most_lora_plus_one_no_grad_forward(model, latent, batch, checkpointing):
    case = make_case(model, batch, checkpointing, rank=8, latent_size=latent)
    acct = accounting(case)
    assert acct["flops_ratio"] <= FLOPS_SLACK, acct
    assert acct["saved_ratio"] <= SAVED_SLACK, acct
    # Not vacuous: the CAT step does more than the LoRA step (the base rows' forward).
    assert acct["flops"]["cat"] > acct["flops"]["lora"]


def test_counters_see_a_known_step():
    """The counters on a step whose costs are known by hand: a frozen linear then a LoRA-like matmul."""
    w = torch.randn(16, 8)  # frozen: a "parameter" of the module below
    a = torch.randn(8, 4, requires_grad=True)
    module = torch.nn.Linear(8, 16, bias=False)
    module.weight.data = w
    module.weight.requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)

    def forward():
        return (module(x) @ torch.ones(16, 1) + (x @ a).sum(1, keepdim=True)).sum()

    # forward: 5x8x16 + 5x16x1 + 5x8x4 multiply-adds; backward: the grads of x (two matmuls, the
    # frozen weight's included) and a; FlopCounterMode counts 2 per multiply-add.
    fwd = 2 * (5 * 8 * 16 + 5 * 16 * 1 + 5 * 8 * 4)
    bwd = 2 * (5 * 16 * 8 + 5 * 1 * 16 + 5 * 4 * 8 + 8 * 5 * 4)
    assert step_flops(lambda: forward().backward()) == fwd + bwd
    # Saved: the ones column (grad of the linear's output), x (grad of a) and a (grad of x); the
    # frozen linear saves only its weight, a parameter, which is not counted.
    recorder = SavedBytes(module)
    with recorder.recording():
        forward()
    assert recorder.total == 4 * (5 * 8 + 16 * 1 + 8 * 4)
    assert saved_bytes(forward, module) == recorder.total
