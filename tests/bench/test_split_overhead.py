"""What the CAT step costs, counted (CPU, deterministic): FLOPs and bytes saved for backward.

Bounds on the SD-shaped tiny and small UNets, with and without checkpointing:
    FLOPs(CAT step)       <= (FLOPs(LoRA step on the 2B adapter rows) + FLOPs(no-grad forward, B rows)) * 1.03
    saved bytes(CAT step) <= saved bytes(LoRA step on the 2B adapter rows) * 1.05
The LoRA step is the engine's (fused layers), checkpointed with diffusers' default (torch,
non-reentrant) when checkpointing is on; saved bytes count the inputs that checkpoint keeps too
(``bench/measure.py``).
"""

from __future__ import annotations

import pytest

from cat_engine.bench.split_overhead import accounting, gradient_check, main, make_case

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


def test_engine_and_naive_peer_agree():
    """The two sides of the comparison compute the same loss and LoRA gradients (SDXL-shaped:
    the plain captions' own pooled text reaches both)."""
    case = make_case("tiny-xl", 2, checkpointing=True, rank=4)
    assert case.data.plain_added_cond_kwargs is not None
    check = gradient_check(case)
    assert check["loss_rel_err"] < 1e-5 and check["max_grad_rel_err"] < 1e-4, check


def test_command_line_prints_one_row_per_mode(capsys):
    main(["--model", "tiny", "--checkpointing", "off", "--repeats", "1", "--no-count", "--no-record"])
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[:2] == ["tiny", "False"]
    assert "engine vs naive" in out
