"""Host work of a training step: dispatched ATen ops and the step's time on the meta device, for
the bench's variants side by side (docs/design.md §7).

    python -m cat_engine.bench.op_counts [--preset tiny] [--batch 1] [--checkpointing] [--rounds 15]

Three figures per variant (``harness.py`` builds them exactly as the bench does):

* **ops**: every ATen op a training step dispatches below autograd (``measure.count_ops``),
  forward + backward and the optimizer step apart, counted on the CPU. Deterministic: the same
  code gives the same count on any machine, so it is a figure tests can pin.
* **meta time**: the process CPU time of forward + backward on meta tensors, which have shapes
  but no data. No kernel runs, but torch computes many meta outputs in Python (its elementwise
  references), so this time weighs elementwise ops heavily.
* **host time**: the process CPU time of a whole training step on the CPU at the smallest
  resolution the model runs (one latent pixel per level of the UNet): the kernels do almost no
  work there, so what is left is the Python and dispatch work of the step, the floor a small
  batch on a fast GPU cannot go under.

Both times are interleaved, one torch thread, median and spread.

The engine's own budget (issue targets, checked and recorded as ``checks``): engine LoRA
dispatches no more ops than peft LoRA on the same rows, and engine CAT no more than peft LoRA on
2B rows plus one no-grad forward of B rows (what CAT costs at best: the adapter on 2B rows and the
frozen model on B). Results append to ``bench/results/op_counts.jsonl``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from cat_engine.bench import measure
from cat_engine.bench.environment import environment
from cat_engine.bench.harness import BenchConfig, build_variants
from cat_engine.bench.report import append_jsonl
from cat_engine.engine.unet_configs import resolve_model

RESULTS = Path(__file__).resolve().parent / "results" / "op_counts.jsonl"
VARIANTS = ("peft_lora", "peft_lora_2b", "engine_lora", "engine_cat", "naive_cat", "base_forward")
TOP_OPS = 12


def _forward_backward(variant):
    if variant.name == "base_forward":  # the no-grad forward
        with torch.no_grad():
            variant.loss()
    else:
        variant.loss().backward()


def count_step_ops(cfg: BenchConfig, names=VARIANTS) -> dict[str, dict]:
    """Per variant: ``forward_backward`` and ``optimizer`` op counts of a steady-state step (the
    second: the optimizer's state exists) and the most frequent ops, counted on the CPU."""
    spec = resolve_model(cfg.preset)
    with measure.torch_threads(1):
        torch.manual_seed(cfg.seed)
        variants, _ = build_variants(cfg, spec, torch.device("cpu"), cfg.resolution or spec.native_resolution)
        out = {}
        for name in names:
            v = variants[name]
            for counting in (False, True):
                fwd_bwd = (
                    measure.count_ops(lambda v=v: _forward_backward(v)) if counting else _forward_backward(v)
                )
                opt = None
                if v.trainer is not None:
                    step = v.trainer.optimizer.step
                    opt = measure.count_ops(step) if counting else step()
                    v.trainer.optimizer.zero_grad(set_to_none=True)
            total = sum(fwd_bwd.values()) + (sum(opt.values()) if opt is not None else 0)
            out[name] = {
                "forward_backward": sum(fwd_bwd.values()),
                "optimizer": sum(opt.values()) if opt is not None else 0,
                "step": total,
                "top_ops": dict(fwd_bwd.most_common(TOP_OPS)),
            }
    return out


def smallest_resolution(cfg: BenchConfig) -> int:
    """Pixels of the smallest image the preset's UNet takes: one latent pixel per down level."""
    spec = resolve_model(cfg.preset)
    return spec.vae_scale_factor * 2 ** (len(spec.config.get("block_out_channels", (0,))) - 1)


def step_seconds(cfg: BenchConfig, rounds: int, device: str, names=VARIANTS) -> dict[str, dict]:
    """Per variant: the spread of the process CPU seconds of a step. ``meta``: forward + backward
    at the configured resolution; ``cpu``: forward, backward and optimizer at the smallest one."""
    spec = resolve_model(cfg.preset)
    resolution = cfg.resolution or spec.native_resolution
    if device == "cpu":
        resolution = smallest_resolution(cfg)
    torch.manual_seed(cfg.seed)
    variants, (_, ctx) = build_variants(cfg, spec, torch.device(device), resolution)

    def step(v):
        if v.trainer is not None and device != "meta":
            v.trainer.step(v.loss, ctx.autocast)
        else:
            _forward_backward(v)

    steps = {name: (lambda v=variants[name]: step(v)) for name in names}
    times = measure.time_interleaved(steps, rounds, device, warmup=2, clock="cpu", threads=1)
    return {name: vars(measure.Spread.of(t)) for name, t in times.items()}


def checks(counts: dict[str, dict]) -> dict[str, dict]:
    """The engine's op budget against the peers', on whole steps (forward, backward, optimizer)."""
    ops = {name: c["step"] for name, c in counts.items()}
    budget = {
        "engine_lora <= peft_lora": (ops["engine_lora"], ops["peft_lora"]),
        "engine_cat <= peft_lora_2b + base_forward": (
            ops["engine_cat"],
            ops["peft_lora_2b"] + ops["base_forward"],
        ),
    }
    return {k: {"engine": a, "budget": b, "ok": a <= b} for k, (a, b) in budget.items()}


def run(cfg: BenchConfig, rounds: int, argv: list[str]) -> dict:
    cfg.validate()
    counts = count_step_ops(cfg)
    meta = step_seconds(cfg, rounds, "meta") if rounds else {}
    host = step_seconds(cfg, rounds, "cpu") if rounds else {}
    return {
        "bench": "op_counts",
        **environment("cpu"),
        "command": "python -m cat_engine.bench.op_counts " + shlex.join(argv),
        "config": {"preset": cfg.preset, "batch": cfg.batch, "rank": cfg.rank, "checkpointing": cfg.checkpointing,
                   "resolution": cfg.resolution, "host_resolution": smallest_resolution(cfg), "rounds": rounds},
        "variants": {
            name: {**counts[name], "meta_seconds": meta.get(name), "host_seconds": host.get(name)} for name in counts
        },
        "checks": checks(counts),
    }  # fmt: skip


def _ms(spread) -> str:
    if not spread:
        return f"{'-':>8} {'':>15}"
    iqr = f"({spread['q1'] * 1e3:.1f}-{spread['q3'] * 1e3:.1f})"
    return f"{spread['median'] * 1e3:8.1f} {iqr:>15}"


def table(record: dict) -> str:
    head = f"{'variant':<14} {'ops/step':>9} {'fwd+bwd':>8} {'optim':>6} {'meta ms':>8} {'(q1-q3)':>15} {'host ms':>8} {'(q1-q3)':>15}"
    lines = [head, "-" * len(head)]
    for name, v in record["variants"].items():
        lines.append(
            f"{name:<14} {v['step']:>9} {v['forward_backward']:>8} {v['optimizer']:>6} "
            f"{_ms(v['meta_seconds'])} {_ms(v['host_seconds'])}"
        )
    for what, c in record["checks"].items():
        lines.append(f"{'ok  ' if c['ok'] else 'OVER'} {what}: {c['engine']} vs {c['budget']}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="a bench preset (default tiny)")
    parser.add_argument("--resolution", type=int, help="pixels (default: the preset's native one)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (the counts)")
    parser.add_argument("--rounds", type=int, default=15, help="timed meta steps per variant (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args(argv)
    cfg = BenchConfig(preset=args.preset, resolution=args.resolution, batch=args.batch, rank=args.rank,
                      checkpointing=args.checkpointing, precision="fp32")  # fmt: skip
    record = run(cfg, args.rounds, argv)
    print(table(record))
    if not args.no_record:
        append_jsonl(args.out, record)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
