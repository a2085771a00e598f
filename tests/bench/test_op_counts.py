"""The engine's op budget, pinned: dispatched ATen ops per training step are deterministic, so the
engine's host work can be held to the peers' (bench/op_counts.py)."""

import pytest

from cat_engine.bench import op_counts
from cat_engine.bench.harness import BenchConfig


@pytest.mark.parametrize("checkpointing", [False, True])
def test_engine_dispatches_no_more_ops_than_peft(checkpointing):
    """Engine LoRA <= peft LoRA on the same rows; engine CAT <= peft LoRA on 2B rows plus one
    no-grad forward of B rows (whole steps: forward, backward, optimizer)."""
    counts = op_counts.count_step_ops(BenchConfig(preset="tiny", checkpointing=checkpointing))
    checks = op_counts.checks(counts)
    assert all(c["ok"] for c in checks.values()), checks
    for name, c in counts.items():
        assert c["step"] == c["forward_backward"] + c["optimizer"] > 0, name
    assert counts["base_forward"]["optimizer"] == 0
    # The same parameters and the same optimizer on both sides: equal optimizer work.
    assert counts["engine_lora"]["optimizer"] == counts["peft_lora"]["optimizer"] > 0
    # The in-place delta of the engine's torch path, never in peft's.
    assert (
        "aten.addmm_" in counts["engine_lora"]["top_ops"]
        and "aten.addmm_" not in counts["peft_lora"]["top_ops"]
    )


def test_checks_compare_whole_steps():
    counts = {
        name: {"step": n}
        for name, n in {
            "engine_lora": 10,
            "peft_lora": 9,
            "engine_cat": 15,
            "peft_lora_2b": 10,
            "base_forward": 5,
        }.items()
    }
    checks = op_counts.checks(counts)
    assert checks["engine_lora <= peft_lora"] == {"engine": 10, "budget": 9, "ok": False}
    assert checks["engine_cat <= peft_lora_2b + base_forward"] == {"engine": 15, "budget": 15, "ok": True}


def test_record_and_table(monkeypatch, tmp_path):
    fake = {"median": 0.002, "q1": 0.001, "q3": 0.003, "min": 0.001, "max": 0.004}
    monkeypatch.setattr(
        op_counts, "step_seconds", lambda cfg, rounds, device: {n: fake for n in op_counts.VARIANTS}
    )
    out = tmp_path / "ops.jsonl"
    op_counts.main(["--rounds", "1", "--out", str(out)])
    import json

    record = json.loads(out.read_text())
    assert record["bench"] == "op_counts" and record["command"].endswith("--rounds 1 --out " + str(out))
    assert len(record["load_average"]) == 3 and record["config"]["host_resolution"] == 8
    assert set(record["variants"]) == set(op_counts.VARIANTS)
    assert record["variants"]["engine_lora"]["host_seconds"] == fake
    assert "ok   engine_lora <= peft_lora" in op_counts.table(record)
