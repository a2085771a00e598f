"""Microbenchmark of the fused LoRA linear on diffusion shapes (docs/design.md §5, §7).

Three ways to compute one LoRA linear, measured side by side in one run:
  frozen: ``x W^T + b`` alone (the floor: what the layer costs without LoRA)
  peft:   ``F.linear(x, W, b) + lora_B(lora_A(x)) * scale`` (peft's unfused path)
  fused:  ``cat_engine.kernels.lora_linear`` (Triton on CUDA; the PyTorch reference on CPU)
each forward only (no grad) and forward+backward (``dx``, ``dA``, ``dB``). Per layer shape, the six
are timed interleaved (``measure.time_interleaved``: CUDA events on a GPU, one thread on a CPU);
median of ``--reps`` timed runs after warm-up. FLOPs from FlopCounterMode on meta tensors.
Results append to bench/results/lora_microbench.jsonl, one JSON line per (config, method, mode).

    python -m cat_engine.bench.lora_microbench [--quick] [--dtype float16] [--adapter-frac 0.5]

Targets on GPU: fused overhead over frozen <= 15%; fused fwd+bwd >= 1.5x faster than peft at r=16.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from cat_engine.bench.environment import environment
from cat_engine.bench.measure import Spread, count_flops, time_interleaved
from cat_engine.bench.report import append_jsonl
from cat_engine.engine.memory_plan import DTYPES
from cat_engine.kernels import lora_linear

RESULTS = Path(__file__).resolve().parent / "results" / "lora_microbench.jsonl"
FULL = {"rows": (1024, 4096, 16384), "dims": (320, 640, 1280), "ranks": (4, 16, 64)}
QUICK = {"rows": (1024,), "dims": (320, 640), "ranks": (4, 16, 64)}
METHODS = ("frozen", "peft", "fused")
MODES = ("fwd", "fwd+bwd")
WARMUP = 3


def make_inputs(M, K, N, r, dtype, device, seed=0):
    """Shared setup: frozen W, b; trainable A, B (non-zero, as after some training); x needs grad."""
    g = torch.Generator().manual_seed(seed)

    def make(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    return {
        "x": make(M, K).requires_grad_(),
        "W": make(N, K) / K**0.5,
        "b": make(N),
        "A": (make(r, K) / K**0.5).requires_grad_(),
        "B": (make(N, r) * 0.1).requires_grad_(),
        "dy": make(M, N),
        "scale": 2.0,
    }


def forward(method, t, rows):
    """One layer forward; ``rows`` leading rows carry the adapter (as a [rows_total, K] batch)."""
    x, W, b, A, B, s = t["x"], t["W"], t["b"], t["A"], t["B"], t["scale"]
    if method == "frozen":
        return F.linear(x, W, b)
    if method == "peft":  # peft: result + lora_B(lora_A(dropout(x))) * scaling, on every row
        y = F.linear(x, W, b)
        if rows == x.shape[0]:
            return y + F.linear(F.linear(x, A), B) * s
        # peft has no split batch: the naive way is a row mask on the delta, costing all rows
        return y + F.linear(F.linear(x, A), B) * s * t["row_mask"]
    return lora_linear(x, W, b, A, B, s, rows)


def call(method, mode, t, rows):
    """A zero-argument callable running one (method, mode) measurement on the inputs ``t``."""
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                forward(method, t, rows)

    else:

        def fn():
            for k in ("x", "A", "B"):
                t[k].grad = None
            forward(method, t, rows).backward(t["dy"])

    return fn


def meta_flops(method, mode, M, K, N, r, dtype, rows):
    """FLOPs of one call, counted on meta tensors (no compute)."""

    def meta(*s, grad=False):
        return torch.empty(*s, device="meta", dtype=dtype, requires_grad=grad)

    t = {
        "x": meta(M, K, grad=True),
        "W": meta(N, K),
        "b": meta(N),
        "A": meta(r, K, grad=True),
        "B": meta(N, r, grad=True),
        "dy": meta(M, N),
        "row_mask": meta(M, 1),
        "scale": 2.0,
    }

    def once():
        y = forward(method, t, rows)
        if mode == "fwd+bwd":
            y.backward(t["dy"])

    return count_flops(once)


def run(grid, dtype, device, reps, adapter_frac, threads: int | None = 1):
    env = environment(device)
    force_triton = os.environ.get("CAT_ENGINE_FORCE_TRITON") == "1"
    path = "triton" if device.type == "cuda" or force_triton else "reference"
    clock = "cuda_events" if device.type == "cuda" else "wall"
    records = []
    for M, K, N, r in itertools.product(grid["rows"], grid["dims"], grid["dims"], grid["ranks"]):
        if grid is QUICK and K != N:  # quick: square layers only
            continue
        t = make_inputs(M, K, N, r, dtype, device)
        rows = max(0, min(M, round(M * adapter_frac)))
        t["row_mask"] = (torch.arange(M, device=device) < rows).to(dtype)[:, None]
        cases = list(itertools.product(METHODS, MODES))
        times = time_interleaved(
            {case: call(*case, t, rows) for case in cases},
            reps,
            device,
            warmup=WARMUP,
            clock=clock,
            threads=threads,
        )
        for method, mode in cases:
            seconds = Spread.of(times[method, mode]).median
            flops = meta_flops(method, mode, M, K, N, r, dtype, rows)
            records.append(
                dict(
                    bench="lora_microbench",
                    **env,
                    path=path if method == "fused" else "torch",
                    force_triton=force_triton,
                    config={
                        "M": M,
                        "K": K,
                        "N": N,
                        "r": r,
                        "dtype": str(dtype).removeprefix("torch."),
                        "adapter_rows": rows,
                        "warmup": WARMUP,
                        "reps": reps,
                        "clock": clock,
                        "threads": threads if device.type == "cpu" else None,
                    },
                    method=method,
                    mode=mode,
                    seconds=seconds,
                    flops=flops,
                    tflops=flops / seconds / 1e12,
                )
            )
    return records


def table(records) -> str:
    by = {
        (tuple(rec["config"][k] for k in "MKNr"), rec["method"], rec["mode"]): rec["seconds"]
        for rec in records
    }
    keys = sorted({k[0] for k in by})
    head = (
        f"{'M':>6} {'K':>5} {'N':>5} {'r':>3} | {'mode':7} | {'frozen ms':>9} {'peft ms':>9} {'fused ms':>9} "
        f"| {'fused/frozen':>12} {'peft/fused':>10}"
    )
    lines = [head, "-" * len(head)]
    for key in keys:
        for mode in MODES:
            fz, pf, fu = (by[(key, m, mode)] * 1e3 for m in METHODS)
            lines.append(
                f"{key[0]:>6} {key[1]:>5} {key[2]:>5} {key[3]:>3} | {mode:7} | {fz:9.3f} {pf:9.3f} {fu:9.3f} |"
                f" {fu / fz:12.2f} {pf / fu:10.2f}"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="M=1024, K=N in {320, 640}, r in {4, 16, 64}")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="default: float16 on CUDA, float32 on CPU",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed runs per measurement (>= 5)")
    parser.add_argument("--adapter-frac", type=float, default=1.0, help="share of rows carrying the adapter")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    reps = max(5, args.reps or (10 if device.type == "cuda" else 7))
    records = run(QUICK if args.quick else FULL, dtype, device, reps, args.adapter_frac, args.threads)
    for rec in records:
        append_jsonl(args.out, rec)
    first = records[0]
    print(
        f"{first['device']['name']} ({device}), torch {first['versions']['torch']}, "
        f"triton {first['versions']['triton']}, {first['config']['dtype']}, "
        f"fused path: {next(r['path'] for r in records if r['method'] == 'fused')}, "
        f"adapter rows {args.adapter_frac:.0%}, median of {reps}"
    )
    print(table(records))
    print(f"appended {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
