"""`cat-engine plan`: the table, the chosen plan, budget parsing and errors."""

from __future__ import annotations

import pytest

from cat_engine.cli import main


def test_plan_sd15_fits_an_8gb_card(capsys):
    assert main(["plan", "--base", "sd15", "--resolution", "512", "--vram-budget", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "sd15: 512 px, batch 1, LoRA rank 16, CAT" in out
    assert "budget 8.00 GiB (8GB)" in out
    rows = [line for line in out.splitlines() if line[:2] in ("1 ", "2 ", "3 ", "4 ")]
    assert len(rows) == 4 and all(r.split()[-1] in ("yes", "no") or "<- chosen" in r for r in rows)
    assert "<- chosen" in rows[0]  # bf16 without checkpointing fits 8 GB at 512 px
    assert "chosen: bf16 sdpa no-ckpt" in out and "--precision bf16" in out


def test_plan_without_budget_prints_the_table_only(capsys):
    assert main(["plan", "--base", "builtin", "--rank", "4"]) == 0
    out = capsys.readouterr().out
    assert "builtin: 64 px" in out and "chosen" not in out


def test_plan_nothing_fits_is_a_user_error(capsys):
    assert main(["plan", "--base", "builtin", "--rank", "4", "--vram-budget", "600MB"]) == 2
    captured = capsys.readouterr()
    assert "fp32 sdpa ckpt" in captured.out  # the table still shows what was tried
    assert "error: no plan fits 600 MiB" in captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--vram-budget", "eight gigs"], "--vram-budget: cannot read 'eight gigs'"),
        (["--base", "no/such/model"], "unknown model"),
        (["--resolution", "66"], "multiple of 4"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_plan_user_errors(args, message, capsys):
    assert main(["plan", "--base", "builtin", *args]) == 2
    assert message in capsys.readouterr().err


def test_plan_help_documents_binary_units(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "G/GB/GiB = 2^30" in help_text and "8192 MiB" in help_text


def test_plan_a_transformer_lists_the_memory_options(capsys):
    assert main(["plan", "--base", "builtin-tiny-flux", "--rank", "4", "--vram-budget", "8GB"]) == 0
    out = capsys.readouterr().out
    assert "builtin-tiny-flux: 64 px" in out and "CPU RAM" in out
    rows = [line for line in out.splitlines() if line[:2] in ("1 ", "2 ", "3 ", "4 ", "5 ")]
    assert len(rows) == 5 and "bf16 sdpa no-ckpt" in rows[0] and "bf16 sdpa ckpt int8 offload" in rows[4]
    assert "chosen: bf16 sdpa no-ckpt" in out


@pytest.mark.slow
def test_plan_flux_at_1024px_fits_a_12gb_card(capsys):
    """The command of the README's Flux.1 table: a plan that fits 12 GB, with the memory options."""
    assert main(["plan", "--base", "flux", "--resolution", "1024", "--vram-budget", "12GB"]) == 0
    out = capsys.readouterr().out
    chosen = [line for line in out.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and chosen[0].split()[-3] == "yes"
    assert "--gradient-checkpointing" in out and "--offload" in out


def test_plan_counts_the_optimizer_state_it_is_told(capsys):
    assert main(["plan", "--base", "builtin", "--optimizer", "prodigy"]) == 0
    prodigy = capsys.readouterr().out
    assert main(["plan", "--base", "builtin"]) == 0
    adamw = capsys.readouterr().out
    assert prodigy != adamw  # four fp32 buffers a tensor instead of two: a larger lora+opt column
