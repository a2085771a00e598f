"""Microbenchmark of the LoRA linear on diffusion shapes, every path side by side (docs/design.md §5, §7).

Ways to compute one LoRA linear, measured in one run:
  frozen: ``x W^T + b`` alone (the floor: what the layer costs without LoRA)
  peft:   ``F.linear(x, W, b) + lora_B(lora_A(x)) * scale`` (peft's unfused path)
  torch:  the engine's cuBLAS-first path (``kernels/lora_torch.py``)
  triton: the engine's Triton path (``kernels/lora_triton.py``; on a GPU, or on a CPU under
          ``TRITON_INTERPRET=1``)
  engine: ``cat_engine.kernels.lora_linear`` as layers call it, the path its dispatch chooses
          (measured once per shape on a GPU: the record's ``path`` says which; the torch path on a CPU)
each forward only (no grad) and forward+backward (``dx``, ``dA``, ``dB``). Per layer shape, all are
timed interleaved (``measure.time_interleaved``: CUDA events on a GPU, one thread on a CPU); median
of ``--reps`` timed runs after warm-up. FLOPs from FlopCounterMode on meta tensors. Results append
to bench/results/lora_microbench.jsonl, one JSON line per (shape, method, mode).

    python -m cat_engine.bench.lora_microbench [--grid quick|gpu|full] [--dtype float16] [--adapter-frac 0.5]

Targets on a GPU, forward+backward: the engine path at least as fast as peft at every shape, and
1.2x faster at M >= 4096.
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
from cat_engine.kernels.lora_torch import TorchLoraLinear
from cat_engine.kernels.lora_triton import triton_installed, triton_lora_linear

RESULTS = Path(__file__).resolve().parent / "results" / "lora_microbench.jsonl"
GRIDS = {
    # every K x N of the diffusion widths
    "full": {"rows": (1024, 4096, 16384), "dims": (320, 640, 1280), "ranks": (4, 16, 64), "square": False},
    # what the GPU suite runs: the three row counts, square layers, the usual ranks
    "gpu": {"rows": (1024, 4096, 16384), "dims": (320, 640, 1280), "ranks": (16, 64), "square": True},
    "quick": {"rows": (1024,), "dims": (320, 640), "ranks": (4, 16, 64), "square": True},
}
METHODS = ("frozen", "peft", "torch", "triton", "engine")
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
    if rows == 0 and method in ("torch", "triton"):
        return F.linear(x, W, b)
    if method == "torch":
        return TorchLoraLinear.apply(x, W, b, A, B, s, rows, None)
    if method == "triton":
        return triton_lora_linear(x, W, b, A, B, s, rows, None)
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
    """FLOPs of one call, counted on meta tensors (no compute); the Triton path counts its custom
    ops' formulas, which equal the torch path's products."""

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
        y = forward("torch" if method in ("triton", "engine") else method, t, rows)
        if mode == "fwd+bwd":
            y.backward(t["dy"])

    return count_flops(once)


def methods_for(device: torch.device) -> tuple[str, ...]:
    """Every method that can run here: the Triton path needs a GPU (or the interpreter) and triton."""
    triton_ok = triton_installed() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    return tuple(m for m in METHODS if m != "triton" or triton_ok)


def dispatched_path(t, rows, grad: bool, device) -> str:
    """The path the engine's dispatch took for this shape (decided at its first, untimed call)."""
    from cat_engine.kernels import dispatch

    forced = dispatch.forced_path()
    if forced is not None or device.type != "cuda":
        return forced or "torch"
    (M, K), (N, r) = t["x"].shape, t["B"].shape
    for key, path in dispatch.DISPATCHER.memory.items():
        if key[3:8] == (M, K, N, r, rows) and key[9] == grad:
            return path
    return "torch"  # not measured (not allowed where it was called): the default


def run(grid, dtype, device, reps, adapter_frac, threads: int | None = 1):
    env = environment(device)
    clock = "cuda_events" if device.type == "cuda" else "wall"
    methods = methods_for(device)
    records = []
    for M, K, N, r in itertools.product(grid["rows"], grid["dims"], grid["dims"], grid["ranks"]):
        if grid.get("square") and K != N:
            continue
        t = make_inputs(M, K, N, r, dtype, device)
        rows = max(0, min(M, round(M * adapter_frac)))
        t["row_mask"] = (torch.arange(M, device=device) < rows).to(dtype)[:, None]
        cases = list(itertools.product(methods, MODES))
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
            path = {"torch": "torch", "triton": "triton"}.get(method, "aten")
            if method == "engine":
                path = dispatched_path(t, rows, mode == "fwd+bwd", device)
            records.append(
                dict(
                    bench="lora_microbench",
                    **env,
                    path=path,
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
    by = {(tuple(rec["config"][k] for k in "MKNr"), rec["method"], rec["mode"]): rec for rec in records}
    methods = [m for m in METHODS if any(k[1] == m for k in by)]
    keys = sorted({k[0] for k in by})
    head = (
        f"{'M':>6} {'K':>5} {'N':>5} {'r':>3} | {'mode':7} | "
        + " ".join(f"{m + ' ms':>10}" for m in methods)
        + f" | {'engine path':>11} {'peft/engine':>11}"
    )
    lines = [head, "-" * len(head)]
    for key in keys:
        for mode in MODES:
            ms = " ".join(f"{by[key, m, mode]['seconds'] * 1e3:10.3f}" for m in methods)
            engine = by[key, "engine", mode]
            speedup = by[key, "peft", mode]["seconds"] / engine["seconds"]
            lines.append(
                f"{key[0]:>6} {key[1]:>5} {key[2]:>5} {key[3]:>3} | {mode:7} | {ms} | {engine['path']:>11} {speedup:11.2f}"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=tuple(GRIDS), default="full", help="shapes to run (default full)")
    parser.add_argument("--quick", action="store_true", help="the quick grid (same as --grid quick)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default=None,
        help="default: bfloat16 on CUDA (what training runs), float32 on CPU",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed runs per measurement (>= 5)")
    parser.add_argument("--adapter-frac", type=float, default=1.0, help="share of rows carrying the adapter")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    reps = max(5, args.reps or (10 if device.type == "cuda" else 7))
    grid = GRIDS["quick" if args.quick else args.grid]
    records = run(grid, dtype, device, reps, args.adapter_frac, args.threads)
    for rec in records:
        append_jsonl(args.out, rec)
    first = records[0]
    print(
        f"{first['device']['name']} ({device}), torch {first['versions']['torch']}, "
        f"triton {first['versions']['triton']}, {first['config']['dtype']}, "
        f"adapter rows {args.adapter_frac:.0%}, median of {reps}"
    )
    print(table(records))
    print(f"appended {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
