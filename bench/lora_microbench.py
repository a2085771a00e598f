"""Microbenchmark of the fused LoRA linear on diffusion shapes (docs/design.md §5, §7).

Three ways to compute one LoRA linear, measured side by side in one run:
  frozen: ``x W^T + b`` alone (the floor: what the layer costs without LoRA)
  peft:   ``F.linear(x, W, b) + lora_B(lora_A(x)) * scale`` (peft's unfused path)
  fused:  ``cat_engine.kernels.lora_linear`` (Triton on CUDA; the PyTorch reference on CPU)
each forward only (no grad) and forward+backward (``dx``, ``dA``, ``dB``). Median of ``--reps``
timed runs after warm-up (CUDA events on GPU). FLOPs from FlopCounterMode on meta tensors.
Results append to bench/results/lora_microbench.jsonl, one JSON line per (config, method, mode).

    python -m cat_engine.bench.lora_microbench [--quick] [--dtype float16] [--adapter-frac 0.5]

Targets on GPU: fused overhead over frozen <= 15%; fused fwd+bwd >= 1.5x faster than peft at r=16.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cat_engine.kernels import lora_linear

RESULTS = Path(__file__).resolve().parent / "results" / "lora_microbench.jsonl"
FULL = {"rows": (1024, 4096, 16384), "dims": (320, 640, 1280), "ranks": (4, 16, 64)}
QUICK = {"rows": (1024,), "dims": (320, 640), "ranks": (4, 16, 64)}
METHODS = ("frozen", "peft", "fused")
MODES = ("fwd", "fwd+bwd")


def make_inputs(M, K, N, r, dtype, device, seed=0):
    """Shared setup: frozen W, b; trainable A, B (non-zero, as after some training); x needs grad."""
    g = torch.Generator().manual_seed(seed)
    def make(*s):
        return torch.randn(*s, generator=g).to(device, dtype)
    return {
        "x": make(M, K).requires_grad_(), "W": make(N, K) / K**0.5, "b": make(N),
        "A": (make(r, K) / K**0.5).requires_grad_(), "B": (make(N, r) * 0.1).requires_grad_(),
        "dy": make(M, N), "scale": 2.0,
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


def time_median(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(method, mode, M, K, N, r, dtype, rows):
    """FLOPs of one call, counted on meta tensors (no compute)."""
    def meta(*s, grad=False):
        return torch.empty(*s, device="meta", dtype=dtype, requires_grad=grad)
    t = {"x": meta(M, K, grad=True), "W": meta(N, K), "b": meta(N), "A": meta(r, K, grad=True),
             "B": meta(N, r, grad=True), "dy": meta(M, N), "row_mask": meta(M, 1), "scale": 2.0}
    with FlopCounterMode(display=False) as counter:
        y = forward(method, t, rows)
        if mode == "fwd+bwd":
            y.backward(t["dy"])
    return counter.get_total_flops()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "triton": triton_version,
                "commit": git_commit(), "threads": torch.get_num_threads(),
                "force_triton": os.environ.get("CAT_ENGINE_FORCE_TRITON") == "1"}


def run(grid, dtype, device, warmup, reps, adapter_frac):
    env = environment(device)
    path = "triton" if device.type == "cuda" or env["force_triton"] else "reference"
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = []
    for M, K, N, r in itertools.product(grid["rows"], grid["dims"], grid["dims"], grid["ranks"]):
        if grid is QUICK and K != N:  # quick: square layers only
            continue
        t = make_inputs(M, K, N, r, dtype, device)
        rows = max(0, min(M, round(M * adapter_frac)))
        t["row_mask"] = (torch.arange(M, device=device) < rows).to(dtype)[:, None]
        for method, mode in itertools.product(METHODS, MODES):
            if mode == "fwd":
                def fn(method=method, t=t, rows=rows):
                    with torch.no_grad():
                        forward(method, t, rows)
            else:
                def fn(method=method, t=t, rows=rows):
                    for k in ("x", "A", "B"):
                        t[k].grad = None
                    forward(method, t, rows).backward(t["dy"])
            seconds = time_median(fn, device, warmup, reps)
            flops = count_flops(method, mode, M, K, N, r, dtype, rows)
            records.append(dict(
                bench="lora_microbench", time=stamp, **env, path=path if method == "fused" else "torch",
                config={"M": M, "K": K, "N": N, "r": r, "dtype": str(dtype).removeprefix("torch."),
                            "adapter_rows": rows, "warmup": warmup, "reps": reps},
                method=method, mode=mode, seconds=seconds, flops=flops, tflops=flops / seconds / 1e12,
            ))
    return records


def table(records) -> str:
    by = {(tuple(rec["config"][k] for k in "MKNr"), rec["method"], rec["mode"]): rec["seconds"] for rec in records}
    keys = sorted({k[0] for k in by})
    head = f"{'M':>6} {'K':>5} {'N':>5} {'r':>3} | {'mode':7} | {'frozen ms':>9} {'peft ms':>9} {'fused ms':>9} | {'fused/frozen':>12} {'peft/fused':>10}"
    lines = [head, "-" * len(head)]
    for key in keys:
        for mode in MODES:
            fz, pf, fu = (by[(key, m, mode)] * 1e3 for m in METHODS)
            lines.append(f"{key[0]:>6} {key[1]:>5} {key[2]:>5} {key[3]:>3} | {mode:7} | {fz:9.3f} {pf:9.3f} {fu:9.3f} |"
                         f" {fu / fz:12.2f} {pf / fu:10.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="M=1024, K=N in {320, 640}, r in {4, 16, 64}")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="default: float16 on CUDA, float32 on CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per measurement (>= 5)")
    parser.add_argument("--adapter-frac", type=float, default=1.0, help="share of rows carrying the adapter")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    reps = max(5, args.reps or (10 if device.type == "cuda" else 7))
    warmup = 3
    records = run(QUICK if args.quick else FULL, dtype, device, warmup, reps, args.adapter_frac)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.writelines(json.dumps(rec, sort_keys=True) + "\n" for rec in records)
    first = records[0]
    print(f"{first['device_name']} ({first['device']}), torch {first['torch']}, triton {first['triton']}, "
          f"{first['config']['dtype']}, fused path: {next(r['path'] for r in records if r['method'] == 'fused')}, "
          f"adapter rows {args.adapter_frac:.0%}, median of {reps}")
    print(table(records))
    print(f"appended {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
