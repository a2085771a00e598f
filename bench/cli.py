"""``cat-engine bench`` (also ``python -m cat_engine.bench``): CAT against its peers, side by side.

Runs diffusers + peft LoRA, naive three-pass CAT, the engine's CAT and the engine's LoRA in one
process, interleaved, and reports time, FLOPs, memory and the ratios between them (harness.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cat_engine.bench import report
from cat_engine.bench.harness import BenchConfig, run_bench
from cat_engine.engine.builtin import cache_root
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.memory_plan import ATTENTION_BACKENDS, PRECISIONS
from cat_engine.engine.unet_configs import MODEL_NAMES

QUICK = dict(preset="tiny", steps=5, warmup=1)
DEFAULTS = dict(preset="tiny", steps=10, warmup=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", help=f"{', '.join(MODEL_NAMES)}, or a local diffusers model folder (default tiny)"
    )
    parser.add_argument(
        "--resolution", type=int, help="image side in pixels (default: the preset's native one)"
    )
    parser.add_argument("--batch", type=int, default=1, help="training images per step, B (default 1)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="autocast dtype; frozen weights in it, LoRA in fp32 (auto, as in train: bf16 on CUDA "
        "(fp16 on GPUs without bf16), else fp32)",
    )
    parser.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default="sdpa",
        help="sdpa (diffusers AttnProcessor2_0), xformers or math (AttnProcessor), as in train",
    )
    parser.add_argument("--checkpointing", action="store_true", help="unet.enable_gradient_checkpointing()")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=False,
        metavar="MODE",
        help="torch.compile the UNets, in mode default or MODE (reduce-overhead, max-autotune); "
        "on CPU for profiling only: known wrong LoRA gradients",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also run the engine's CAT and LoRA steps captured as CUDA graphs (CUDA only)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per variant (default 10; --quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant first (default 2; --quick 1)")
    parser.add_argument("--cat-weight", type=float, default=1.0, help="lambda of the CAT term (default 1.0)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads on a CPU (default 1: ratios side by side)"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu", "cuda_events"),
        default="wall",
        help="wall (default; the device synchronised around each step), cpu (the process's CPU time: "
        "steadier on a shared CPU, one thread) or cuda_events",
    )
    parser.add_argument(
        "--variants",
        help="comma-separated variants to run (default all), e.g. peft_lora,engine_lora for an A/B",
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, few steps: a quick check on a CPU")
    parser.add_argument(
        "--results-dir",
        type=Path,
        help=f"where {report.RESULTS_FILE} and the chart go (default: bench/results in a checkout)",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument(
        "--no-flops-cache",
        action="store_true",
        help="count FLOPs again even if this model, shape and source were counted before",
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    defaults = QUICK if args.quick else DEFAULTS
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return BenchConfig(
        preset=args.preset or defaults["preset"],
        resolution=args.resolution,
        batch=args.batch,
        rank=args.rank,
        precision=args.precision,
        attention=args.attention,
        checkpointing=args.checkpointing,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        steps=args.steps if args.steps is not None else defaults["steps"],
        warmup=args.warmup if args.warmup is not None else defaults["warmup"],
        cat_weight=args.cat_weight,
        seed=args.seed,
        device=device,
        threads=args.threads,
        clock=args.clock,
        variants=tuple(v.strip() for v in args.variants.split(",")) if args.variants else None,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise CatEngineError("--device cuda: no CUDA device visible to torch")
    try:
        cfg.validate()
        cache = None if args.no_flops_cache else cache_root() / "bench-flops.json"
        result = run_bench(cfg, flops_cache=cache)
    except ValueError as exc:  # bad preset, resolution or knob: one line, no traceback
        raise CatEngineError(str(exc)) from None
    record = report.make_record(result, torch.device(result["config"]["device"]))
    results_dir = args.results_dir or report.default_results_dir()
    if not args.no_chart:
        try:
            chart = report.write_chart(record, results_dir / report.chart_name(record["config"]))
            record["chart"] = chart.name
        except ImportError as exc:
            record["warnings"].append(f"no chart: {exc}")
    print(report.table(record))
    jsonl = results_dir / report.RESULTS_FILE
    report.append_jsonl(jsonl, record)
    print(f"results appended to {jsonl}")
    if record.get("chart"):
        print(f"chart: {results_dir / record['chart']}")
    return 0
