"""The LoRA microbenchmark's records: every (method, mode) of a shape, FLOPs counted by hand."""

import os

import torch

from cat_engine.bench import lora_microbench as mb

M, K, N, R = 8, 16, 24, 4


def test_records_and_table():
    grid = {"rows": (M,), "dims": (K, N), "ranks": (R,)}
    methods = mb.methods_for(torch.device("cpu"))
    assert "triton" not in methods or os.environ.get("TRITON_INTERPRET") == "1"
    records = mb.run(grid, torch.float32, torch.device("cpu"), reps=1, adapter_frac=1.0)
    assert len(records) == 4 * len(methods) * len(mb.MODES)  # (K, N) in {16, 24}^2
    by = {(r["config"]["K"], r["config"]["N"], r["method"], r["mode"]): r for r in records}
    rec = by[K, N, "frozen", "fwd"]
    assert rec["flops"] == 2 * M * K * N
    assert rec["path"] == "aten" and by[K, N, "engine", "fwd"]["path"] == "torch"  # a CPU: not measured
    for method in ("torch", "engine"):
        assert by[K, N, method, "fwd+bwd"]["flops"] == by[K, N, "peft", "fwd+bwd"]["flops"]
    lora_fwd = 2 * M * K * N + 2 * M * K * R + 2 * M * R * N
    assert by[K, N, "peft", "fwd"]["flops"] == lora_fwd
    # backward: dx through W and the LoRA branch, dA, dB and the grad of x A^T
    lora_bwd = 2 * M * N * K + 2 * M * R * K + 2 * M * K * R + 2 * (2 * M * R * N)
    assert by[K, N, "peft", "fwd+bwd"]["flops"] == lora_fwd + lora_bwd
    for r in records:
        assert r["seconds"] > 0 and r["config"]["threads"] == 1
        assert {"time", "device", "versions", "git"} <= set(r)
    text = mb.table(records)
    assert len(text.splitlines()) == 2 + 4 * len(mb.MODES)
    assert "engine path" in text.splitlines()[0]
