"""The GPU suite's checks that are not the bench itself (bench/gpu_suite.sh runs each one).

    python -m cat_engine.bench.gpu_checks train-peak --base DIR --resolution 512 --out FILE.jsonl
    python -m cat_engine.bench.gpu_checks resident --preset sd15 --out FILE.jsonl
    python -m cat_engine.bench.gpu_checks profile --preset sd15 --out DIR
    python -m cat_engine.bench.gpu_checks compile --preset small --out FILE.jsonl
    python -m cat_engine.bench.gpu_checks nccl --out FILE.jsonl
    python -m cat_engine.bench.gpu_checks summary OUTDIR

* ``train-peak``: the peak CUDA memory of a training process, ``cat-engine train``'s own code in
  this process (bf16, gradient checkpointing, batch 1): while it prepares the data (VAE and text
  encoders on the GPU), and over the training steps alone (what stays: the bf16 UNet, the LoRA
  tensors, their optimizer state, the cached latents, plus a step's working memory).
* ``resident``: what the bench process keeps on the GPU between steps, by owner: frozen weights
  (shared by the engine's and the peers' UNets), LoRA tensors, gradients, optimizer state, every
  other tensor Python can reach (the largest listed), what Python cannot reach (autograd graphs,
  CUDA graph pools, library workspaces) and the caching allocator's reserve.
* ``profile``: a ``torch.profiler`` table of one engine CAT step (the 20 operations and kernels
  with the most CUDA time) and the step's CPU time against its CUDA kernel time.
* ``compile``: ``torch.compile`` of a LoRA UNet on the GPU in each mode, through the gradient check
  ``cat-engine train --compile`` runs: kept (gradients agree) or refused, and how long it took.
* ``nccl``: the data-parallel recipe (DDP on the LoRA tensors, all-reduces) on the nccl backend
  with one rank, against the same training without a process group.
* ``summary``: one short table of the suite's figures against the targets of docs/design.md.

Every record carries ``measure``'s environment (device, versions, commit) and appends to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import tempfile
import time
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_engine.bench import measure
from cat_engine.bench.environment import environment
from cat_engine.bench.harness import BenchConfig, build_variants
from cat_engine.bench.report import append_jsonl, read_jsonl
from cat_engine.engine.unet_configs import resolve_model

GIB = 2**30
CUDA = torch.device("cuda")
# The targets (docs/design.md, issue "never slower than peft on a GPU"), as the summary checks them.
TRAIN_PEAK_TARGET_GIB = {512: 3.5, 1024: 7.5}


def _record(kind: str, **fields) -> dict:
    return {"bench": f"gpu_checks.{kind}", **environment(CUDA), **fields}


def _bench_variants(preset: str, resolution: int | None, batch: int, checkpointing: bool):
    cfg = BenchConfig(preset=preset, resolution=resolution, batch=batch, precision="bf16",
                      checkpointing=checkpointing, device="cuda")  # fmt: skip
    spec = resolve_model(preset)
    variants, (peft_unet, ctx) = build_variants(cfg, spec, CUDA, resolution or spec.native_resolution)
    return cfg, variants, peft_unet, ctx


def _run(variant, ctx) -> None:
    if variant.trainer is None:
        with torch.no_grad(), ctx.autocast():
            variant.loss()
    else:
        variant.trainer.step(variant.loss, ctx.autocast)


# ------------------------------------------------------------------------------ train-peak
def train_peak(base: str, resolution: int, steps: int = 3, cuda_graphs: bool = False) -> dict:
    """Peak CUDA memory of ``cat-engine train`` (bf16, checkpointing, batch 1) in this process."""
    from cat_engine.cat import train as train_mod
    from cat_engine.cat.config import TrainConfig
    from cat_engine.engine.memory_plan import MemoryPlan

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            base=base, resolution=resolution, steps=steps, save_every=0, batch_size=1, output=out, device="cuda",
            memory=MemoryPlan(precision="bf16", gradient_checkpointing=True), cuda_graphs=cuda_graphs,
        ).validate()  # fmt: skip
        memory = measure.CudaMemory(CUDA)
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer = train_mod.Trainer.setup(config)
        setup_s, setup_peak, resident = (
            time.perf_counter() - start,
            memory.peak_allocated(),
            memory.allocated(),
        )
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train(progress=False)
        torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        record = _record(
            "train_peak", base=base, resolution=resolution, steps=steps, cuda_graphs=cuda_graphs,
            setup_peak_bytes=setup_peak, resident_after_setup_bytes=resident,
            train_peak_bytes=memory.peak_allocated(),
            train_peak_reserved_bytes=int(torch.cuda.max_memory_reserved()),
            nvml_used_bytes=memory.nvml_used(), setup_seconds=setup_s, seconds_per_step=train_s / steps,
        )  # fmt: skip
    record["process_peak_bytes"] = max(record["setup_peak_bytes"], record["train_peak_bytes"])
    return record


# ------------------------------------------------------------------------------- resident
def resident(preset: str, resolution: int | None, batch: int, checkpointing: bool) -> dict:
    """What the bench process holds on the GPU after every variant ran one step, by owner."""
    _, variants, peft_unet, ctx = _bench_variants(preset, resolution, batch, checkpointing)
    for v in variants.values():
        _run(v, ctx)
    torch.cuda.synchronize()
    owners: dict[str, dict] = {}
    seen: set = set()

    def claim(owner: str, tensors) -> None:
        for t in tensors:
            if torch.is_tensor(t) and t.is_cuda:
                key, nbytes = measure._storage_key(t)
                if key not in seen:
                    seen.add(key)
                    owners.setdefault(owner, {"bytes": 0, "tensors": 0})
                    owners[owner]["bytes"] += nbytes
                    owners[owner]["tensors"] += 1

    unets = (ctx.unet, peft_unet)
    lora = [p for u in unets for n, p in u.named_parameters() if "lora_" in n]
    claim("LoRA tensors", lora)
    claim("gradients", [p.grad for p in lora if p.grad is not None])
    optimizers = {
        id(v.trainer.optimizer): v.trainer.optimizer for v in variants.values() if v.trainer is not None
    }
    claim("optimizer state", [t for o in optimizers.values() for s in o.state.values() for t in s.values()])
    claim(
        "frozen weights",
        [t for u in unets for n, t in (*u.named_parameters(), *u.named_buffers()) if "lora_" not in n],
    )
    others = []
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.is_cuda and measure._storage_key(obj)[0] not in seen:
                others.append(obj)
        except ReferenceError:  # a dead weak proxy
            continue
    largest = sorted(others, key=lambda t: t.untyped_storage().nbytes(), reverse=True)
    listed = [
        {"shape": list(t.shape), "dtype": str(t.dtype), "bytes": t.untyped_storage().nbytes()}
        for t in largest
    ]
    claim("other tensors reachable from Python", others)
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    found = sum(o["bytes"] for o in owners.values())
    owners["not reachable from Python (autograd graphs, CUDA graph pools, workspaces)"] = {
        "bytes": max(0, allocated - found), "tensors": None,
    }  # fmt: skip
    return _record(
        "resident", preset=preset, resolution=resolution, batch=batch, checkpointing=checkpointing,
        allocated_bytes=allocated, reserved_bytes=reserved, allocator_reserve_bytes=reserved - allocated,
        nvml_used_bytes=measure.CudaMemory(CUDA).nvml_used(), owners=owners, largest_other_tensors=listed[:15],
    )  # fmt: skip


# -------------------------------------------------------------------------------- profile
def _self_device_us(event) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def profile_step(
    preset: str, resolution: int | None, batch: int, checkpointing: bool, out: Path, steps: int = 3
):
    """``torch.profiler`` over ``steps`` engine CAT steps: the top-20 table and CPU vs CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    _, variants, _, ctx = _bench_variants(preset, resolution, batch, checkpointing)
    v = variants["engine_cat"]
    for _ in range(3):
        _run(v, ctx)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            _run(v, ctx)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    averages = prof.key_averages()
    table = None
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=20)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    cuda_us = sum(e.time_range.elapsed_us() for e in kernels)
    top = sorted(averages, key=_self_device_us, reverse=True)[:20]
    out.mkdir(parents=True, exist_ok=True)
    name = (
        f"profile_engine_cat_{preset}_{resolution or 'native'}px_b{batch}{'_ckpt' if checkpointing else ''}"
    )
    (out / f"{name}.txt").write_text(table or "")
    record = _record(
        "profile", preset=preset, resolution=resolution, batch=batch, checkpointing=checkpointing, steps=steps,
        wall_seconds_per_step=wall, cuda_kernel_seconds_per_step=cuda_us / 1e6 / steps,
        kernels_per_step=len(kernels) / steps,
        gpu_busy_fraction=(cuda_us / 1e6 / steps) / wall if wall else None,
        top=[{"name": e.key, "count": e.count, "self_cuda_us": _self_device_us(e),
              "self_cpu_us": e.self_cpu_time_total} for e in top],
        table=f"{name}.txt",
    )  # fmt: skip
    return record, table


# -------------------------------------------------------------------------------- compile
def compile_check(preset: str, resolution: int | None, modes: list[str]) -> dict:
    """Each ``--compile`` mode on a LoRA UNet on the GPU, through train's gradient check."""
    from cat_engine.bench.presets import build_unet, make_batch
    from cat_engine.engine.lora import add_lora, fuse_lora
    from cat_engine.engine.memory_plan import MemoryPlan, apply_memory_plan, compiled_modules

    spec = resolve_model(preset)
    res = resolution or spec.native_resolution
    results = {}
    for mode in modes:
        torch._dynamo.reset()
        unet = fuse_lora(add_lora(build_unet(spec, CUDA), rank=16, seed=0))
        check = make_batch(spec, 1, res, CUDA)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx = apply_memory_plan(
                unet, MemoryPlan(precision="bf16", compile=mode), CUDA, check_inputs=check
            )
        results[mode] = {
            "kept": bool(compiled_modules(ctx.unet)),
            "seconds": time.perf_counter() - start,
            "warnings": [str(w.message)[:300] for w in caught if "compile" in str(w.message)],
        }
        del unet, ctx
        torch.cuda.empty_cache()
    return _record("compile", preset=preset, resolution=res, modes=results)


# ----------------------------------------------------------------------------------- nccl
def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_world_one(steps: int = 3) -> dict:
    """The recipe under DDP on nccl with one rank: it runs, and trains the adapter a process
    without a group trains (up to the GPU's run-to-run rounding)."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from cat_engine.cat import train as train_mod
    from cat_engine.cat.config import TrainConfig
    from cat_engine.engine import distributed as dist
    from cat_engine.engine.builtin import builtin_model_dir

    @dataclass(frozen=True)
    class OneRankGroup(dist.DistContext):
        @property
        def enabled(self) -> bool:  # a group of one: every collective runs
            return True

    base = str(builtin_model_dir(pretrained=False))
    weights, ddp, backend = {}, False, None
    for grouped in (False, True):
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(base=base, steps=steps, batch_size=2, rank=4, save_every=0, output=out,
                                 device="cuda", lr=1e-3).validate()  # fmt: skip
            ranks = dist.SINGLE
            if grouped:
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
                tdist.init_process_group("nccl", rank=0, world_size=1)
                ranks = OneRankGroup(0, 1, 0)
            try:
                trainer = train_mod.Trainer.setup(config, ranks)
                if grouped:
                    ddp, backend = isinstance(trainer.step_fn, DistributedDataParallel), tdist.get_backend()
                trainer.train(progress=False)
                trainer.save()
                weights[grouped] = {k: v.detach().float().cpu() for k, v in trainer.lora.items()}
            finally:
                if grouped:
                    dist.shutdown(ranks)
    diff = max((weights[True][k] - weights[False][k]).abs().max().item() for k in weights[False])
    return _record("nccl", steps=steps, backend=backend, ddp=ddp, max_weight_diff_vs_single=diff)


# -------------------------------------------------------------------------------- summary
def _ratio_line(name, value, target, better="<="):
    if value is None:
        return f"  {name:<58} {'OWED':>8}"
    ok = value <= target if better == "<=" else value >= target
    return f"  {name:<58} {value:8.3f}  target {better} {target}  {'ok' if ok else 'MISSED'}"


def summary(out: Path) -> str:
    """The suite's figures against the targets; OWED where a step left no figure."""
    lines = ["suite summary (figures from " + str(out) + ")"]
    micro = out / "lora_microbench.jsonl"
    lines.append("LoRA linear, fwd+bwd, peft time / engine time (worst shape per M):")
    if micro.exists():
        recs = [r for r in read_jsonl(micro) if r["mode"] == "fwd+bwd"]
        by = {(tuple(r["config"][k] for k in "MKNr"), r["method"]): r for r in recs}
        for m in sorted({k[0][0] for k in by}):
            worst = min(
                by[k, "peft"]["seconds"] / by[k, "engine"]["seconds"]
                for k, meth in by
                if k[0] == m and meth == "engine"
            )
            lines.append(_ratio_line(f"M={m}", worst, 1.2 if m >= 4096 else 1.0, ">="))
    else:
        lines.append(_ratio_line("microbench", None, 1.0))
    bench = out / "bench.jsonl"
    for rec in read_jsonl(bench) if bench.exists() else []:
        c, r = rec["config"], rec["ratios"]
        v = {x["name"]: x for x in rec["variants"]}
        lines.append(f"bench {Path(c['preset']).name} {c['resolution']} px B={c['batch']} {c['precision']}"
                     f"{' ckpt' if c['checkpointing'] else ''}:")  # fmt: skip
        lines.append(_ratio_line("engine LoRA / peft LoRA", r.get("engine_lora_over_peft_lora_time"), 1.0))
        lines.append(
            _ratio_line("engine CAT / peft LoRA, eager", r.get("engine_cat_over_peft_lora_time"), 1.3)
        )
        if "engine_cat_graphs_over_peft_lora_time" in r:
            lines.append(
                _ratio_line(
                    "engine CAT / peft LoRA, CUDA graph", r["engine_cat_graphs_over_peft_lora_time"], 1.0
                )
            )
        for name in ("engine_cat", "engine_cat_graphs"):
            mfu = v.get(name, {}).get("mfu")
            if (
                mfu is not None
                and name == "engine_cat_graphs"
                and c["batch"] == 4
                and c["resolution"] == 1024
            ):
                lines.append(_ratio_line(f"MFU {name}", mfu, 0.30, ">="))  # the target's configuration
            elif mfu is not None:
                lines.append(f"  MFU {name:<54} {mfu * 100:7.1f}%")
    if not bench.exists():
        lines.append("bench: OWED")
    peaks = out / "train_peak.jsonl"
    lines.append("training process peak, bf16, checkpointing, B=1:")
    for rec in read_jsonl(peaks) if peaks.exists() else []:
        name = (
            f"{Path(rec['base']).name} {rec['resolution']} px (steps {rec['train_peak_bytes'] / GIB:.2f} GiB)"
        )
        target = TRAIN_PEAK_TARGET_GIB.get(rec["resolution"], float("inf"))
        lines.append(_ratio_line(name + ", process GiB", rec["process_peak_bytes"] / GIB, target))
    if not peaks.exists():
        lines.append(_ratio_line("train peaks", None, 0))

    def eval_line(label, d):
        return _ratio_line(label, d["ratio_per_prompt"], 2.0, ">=")

    def compile_line(label, d):
        modes = (
            f"{m} {'kept' if x['kept'] else 'REFUSED'} ({x['seconds']:.0f} s)" for m, x in d["modes"].items()
        )
        return f"  {label}: " + ", ".join(modes)

    def nccl_line(label, d):
        return f"  {label}: DDP {d['ddp']}, backend {d['backend']}, weights vs single {d['max_weight_diff_vs_single']:.2e}"

    for file, label, line in (
        ("eval_throughput.json", "cat-engine eval / diffusers per prompt, images/s", eval_line),
        ("compile.jsonl", "--compile on CUDA (gradient check)", compile_line),
        ("nccl.jsonl", "nccl, world size 1", nccl_line),
    ):
        path = out / file
        if not path.exists():
            lines.append(f"  {label}: OWED")
            continue
        data = json.loads(path.read_text()) if file.endswith(".json") else read_jsonl(path)[-1]
        lines.append(line(label, data))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    for name in ("train-peak", "resident", "profile", "compile", "nccl"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        if name == "train-peak":
            p.add_argument("--base", required=True)
            p.add_argument("--resolution", type=int, required=True)
            p.add_argument("--steps", type=int, default=3)
            p.add_argument("--cuda-graphs", action="store_true")
        if name in ("resident", "profile", "compile"):
            p.add_argument("--preset", default="sd15")
            p.add_argument("--resolution", type=int)
            p.add_argument("--batch", type=int, default=1)
            p.add_argument("--checkpointing", action="store_true")
        if name == "compile":
            p.add_argument("--modes", default="default,reduce-overhead")
    p = sub.add_parser("summary")
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.check == "summary":
        print(summary(args.out))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_checks {args.check}: needs a CUDA device")
    if args.check == "train-peak":
        record = train_peak(args.base, args.resolution, args.steps, args.cuda_graphs)
        print(f"train peak {args.base} {args.resolution} px: setup {record['setup_peak_bytes'] / GIB:.2f} GiB, "
              f"steps {record['train_peak_bytes'] / GIB:.2f} GiB, {record['seconds_per_step']:.3f} s/step")  # fmt: skip
    elif args.check == "resident":
        record = resident(args.preset, args.resolution, args.batch, args.checkpointing)
        for owner, o in record["owners"].items():
            print(f"{o['bytes'] / GIB:8.2f} GiB  {owner}")
        print(f"{record['allocator_reserve_bytes'] / GIB:8.2f} GiB  allocator reserve (reserved - allocated)")
    elif args.check == "profile":
        record, table = profile_step(args.preset, args.resolution, args.batch, args.checkpointing, args.out)
        print(table)
        print(f"step: {record['wall_seconds_per_step'] * 1e3:.1f} ms wall, {record['cuda_kernel_seconds_per_step'] * 1e3:.1f} ms "
              f"of CUDA kernels ({record['kernels_per_step']:.0f} kernels, GPU busy {record['gpu_busy_fraction']:.0%})")  # fmt: skip
        args.out = args.out / "profile.jsonl"
    elif args.check == "compile":
        record = compile_check(args.preset, args.resolution, args.modes.split(","))
        print(json.dumps(record["modes"], indent=1))
    else:
        record = nccl_world_one()
        print(
            f"nccl world 1: DDP {record['ddp']}, weights vs single {record['max_weight_diff_vs_single']:.2e}"
        )
    append_jsonl(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
