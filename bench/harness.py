"""One bench run: build the peers and the engine on the same frozen weights, run them interleaved.

Variants (every step = forward + loss + backward + AdamW step on the LoRA parameters):

| name           | what                                                         | rows |
|----------------|--------------------------------------------------------------|------|
| peft_lora      | (1) diffusers + peft plain LoRA                              | B    |
| naive_cat      | (2) three-pass CAT with peft (bench/peers.py)                | B    |
| engine_cat     | (3) ``cat_loss`` on the UNet ``cat-engine train`` prepares   | B    |
| engine_lora    | (4) ``cat_loss(..., cat_weight=0)`` on the same UNet         | B    |
| peft_lora_2b   | plain LoRA on 2B rows: what naive CAT's overhead is taken from | 2B |
| engine_lora_2b | the engine's plain LoRA on 2B rows: the same for the engine  | 2B   |
| base_forward   | one no-grad forward of the frozen model: the overhead's unit | B    |
| engine_cat_graphs, engine_lora_graphs | with ``--cuda-graphs``: the engine's steps captured as one CUDA graph and replayed (engine/cuda_graphs.py) | B |

CAT overhead, in no-grad forwards (target <= 1.0):

    overhead = (t_CAT_step(B) - t_LoRA_step(2B rows)) / t_nograd_forward(B)

The engine's UNet is prepared as ``cat-engine train`` prepares it: ``add_lora``, ``fuse_lora``,
``apply_memory_plan`` (attention, checkpointing, frozen-weight casts, autocast, loss scaling,
compile with its gradient check) and ``make_optimizer`` (fused AdamW where supported). The peers'
UNet shares its frozen weights, carries an equal peft adapter and is set up the way other
trainers do it (bench/peers.py), with the same knobs. Steps run round-robin, the starting variant
rotating each round (``measure.time_interleaved``).
"""

from __future__ import annotations

import hashlib
import json
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cat_engine.bench import measure, peers
from cat_engine.bench.presets import build_unet, make_batch, shared_weights_copy
from cat_engine.cat import cat_loss
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.cuda_graphs import GraphedStep, check_cuda_graphs
from cat_engine.engine.files import write_text_atomically
from cat_engine.engine.lora import add_lora, default_targets, fuse_lora, lora_parameters
from cat_engine.engine.memory_plan import (
    ATTENTION_BACKENDS,
    PRECISIONS,
    MemoryPlan,
    apply_memory_plan,
    compiled_modules,
    make_grad_scaler,
    make_optimizer,
)
from cat_engine.engine.unet_configs import ModelSpec, resolve_model

MAIN_VARIANTS = ("peft_lora", "naive_cat", "engine_cat", "engine_lora")
AUX_VARIANTS = ("peft_lora_2b", "engine_lora_2b", "base_forward")
VARIANTS = MAIN_VARIANTS + AUX_VARIANTS
# With --cuda-graphs (CUDA only): graphed twins of engine variants, by name -> the eager variant.
GRAPHED_VARIANTS = {"engine_cat_graphs": "engine_cat", "engine_lora_graphs": "engine_lora"}
LABELS = {
    "peft_lora": "diffusers+peft LoRA",
    "naive_cat": "naive 3-pass CAT (peft)",
    "engine_cat": "engine CAT",
    "engine_lora": "engine LoRA",
    "peft_lora_2b": "peft LoRA, 2B rows",
    "engine_lora_2b": "engine LoRA, 2B rows",
    "base_forward": "no-grad forward, B rows",
    "engine_cat_graphs": "engine CAT, CUDA graph",
    "engine_lora_graphs": "engine LoRA, CUDA graph",
}
CPU_COMPILE_WARNING = (
    "torch.compile on CPU: torch 2.13's inductor is known to give wrong LoRA gradients for "
    "diffusers UNets (docs/design.md §6); these timings are for profiling only"
)
WEIGHT_DECAY = 1e-2  # AdamW's, as cat-engine train and the peers' scripts set it


@dataclass
class BenchConfig:
    preset: str = "tiny"  # a name of unet_configs.MODEL_NAMES or a local diffusers folder
    resolution: int | None = None  # pixels; None: the preset's native resolution
    batch: int = 1  # B: training images per step
    rank: int = 16
    precision: str = "fp32"  # memory_plan.PRECISIONS: autocast, frozen weights in it, LoRA fp32
    attention: str = "sdpa"  # memory_plan.ATTENTION_BACKENDS
    checkpointing: bool = False
    compile: bool | str = False  # False or a torch.compile mode (memory_plan.COMPILE_MODES; True: default)
    cuda_graphs: bool = False  # add the engine's variants as captured CUDA graphs (GRAPHED_VARIANTS)
    steps: int = 5  # timed steps per variant
    warmup: int = 2  # untimed steps per variant first (at least one is always run)
    cat_weight: float = 1.0
    lr: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    threads: int | None = 1  # torch threads on a CPU (docs/design.md §7); None: as set
    clock: str = "wall"  # measure.CLOCKS; "cpu": the process's CPU time, steadier on a shared CPU
    variants: tuple[str, ...] | None = None  # run only these (e.g. an A/B of two); None: all

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        for name in ("batch", "rank", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        unknown = sorted(set(self.variants or ()) - set(VARIANTS) - set(GRAPHED_VARIANTS))
        if unknown:
            raise ValueError(
                f"unknown variant {unknown[0]!r}; known: {', '.join((*VARIANTS, *GRAPHED_VARIANTS))}"
            )
        if self.clock not in measure.CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(measure.CLOCKS)}, got {self.clock!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def plan(self) -> MemoryPlan:
        return MemoryPlan(
            attention=self.attention,
            gradient_checkpointing=self.checkpointing,
            precision=self.precision,
            compile=self.compile,
        )


@dataclass
class Variant:
    name: str
    rows: int  # UNet rows of the training batch (B or 2B); the CAT passes add their own
    loss: object  # () -> loss tensor (for base_forward: the prediction)
    trainer: Trainer | None  # None: a no-grad forward, no backward, no optimizer step


class GraphedTrainer:
    """The same step as :class:`Trainer`, captured as a CUDA graph per loss function and replayed
    (``engine/cuda_graphs.py``); the optimizer must be capturable. No gradient clipping: the
    eager trainers do none either."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.graphs: dict = {}

    def step(self, loss_fn, autocast) -> None:
        if loss_fn not in self.graphs:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.graphs[loss_fn] = GraphedStep(
                lambda: (loss_fn(),), params, self.optimizer, autocast=autocast
            )
        self.graphs[loss_fn]()


class Trainer:
    """One UNet's optimizer step: backward (through the loss scaler in fp16), step, grads freed."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler=None):
        self.optimizer = optimizer
        self.scaler = scaler

    def step(self, loss_fn, autocast) -> None:
        with autocast():
            loss = loss_fn()
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        # Grads freed right after the step, so no variant's peak memory holds another's grads.
        self.optimizer.zero_grad(set_to_none=True)


def engine_loss(unet, batch: CatBatch, cat_weight: float) -> torch.Tensor:
    b = batch
    return cat_loss(
        unet,
        b.noisy_latents,
        b.timesteps,
        b.token_embeds,
        b.plain_embeds,
        b.target,
        cat_weight=cat_weight,
        added_cond_kwargs=b.added_cond_kwargs,
        plain_added_cond_kwargs=b.plain_added_cond_kwargs,
    ).loss


def variant_losses(peft_unet, engine_unet, batch: CatBatch, cat_weight: float) -> dict:
    """name -> (rows, loss function, which UNet trains or None for the no-grad forward)."""
    double = batch.repeated(2)
    return {
        "peft_lora": (batch.rows, lambda: peers.peft_lora_loss(peft_unet, batch), "peft"),
        "naive_cat": (batch.rows, lambda: peers.naive_cat_loss(peft_unet, batch, cat_weight), "peft"),
        "engine_cat": (batch.rows, lambda: engine_loss(engine_unet, batch, cat_weight), "engine"),
        "engine_lora": (batch.rows, lambda: engine_loss(engine_unet, batch, 0.0), "engine"),
        "peft_lora_2b": (double.rows, lambda: peers.peft_lora_loss(peft_unet, double), "peft"),
        "engine_lora_2b": (double.rows, lambda: engine_loss(engine_unet, double, 0.0), "engine"),
        "base_forward": (batch.rows, lambda: peers.base_forward(peft_unet, batch), None),
    }


def _compile_check_inputs(batch: CatBatch) -> CatBatch:
    """One row of the batch: the inputs ``apply_memory_plan`` checks compiled gradients on."""
    return batch.map(lambda t: t[:1])


def build_models(
    cfg: BenchConfig, spec: ModelSpec, device: torch.device, batch: CatBatch, checkpoint_func=None
):
    """``(peft UNet, engine MemoryContext)``: one set of frozen weights, two equal LoRA adapters.

    The engine's UNet goes through what ``cat-engine train`` does (add_lora, fuse_lora,
    apply_memory_plan); the peft twin shares its frozen weights (already in the plan's dtype) and
    gets the plan's knobs the peers' way. On ``meta`` (FLOP counting) the plan keeps only the
    attention: the count is of the model's own work, the same whatever precision, recompute or
    compilation the plan adds (xformers is counted as SDPA, which FlopCounterMode knows).
    """
    plan = cfg.plan()
    if device.type == "meta":
        plan = MemoryPlan(attention="sdpa" if cfg.attention == "xformers" else cfg.attention)
    engine = build_unet(spec, device, seed=cfg.seed)
    add_lora(engine, rank=cfg.rank, targets=default_targets(engine), seed=cfg.seed)
    fuse_lora(engine)
    ctx = apply_memory_plan(
        engine,
        plan,
        device,
        check_inputs=_compile_check_inputs(batch) if plan.compile else None,
        checkpoint_func=checkpoint_func,
    )
    peft_unet = peers.prepare_peer(shared_weights_copy(engine), engine, ctx.plan, checkpoint_func)
    if device.type != "meta":  # as in training (diffusers also checkpoints only in training mode)
        for unet in (peft_unet, engine):
            unet.train()
    return peft_unet, ctx


def build_variants(
    cfg: BenchConfig, spec: ModelSpec, device: torch.device, resolution: int, checkpoint_func=None
):
    """``(variants by name, (peft UNet, engine MemoryContext))``."""
    batch = make_batch(spec, cfg.batch, resolution, device, seed=cfg.seed)
    peft_unet, ctx = build_models(cfg, spec, device, batch, checkpoint_func)
    trainers = {}
    if device.type != "meta":
        scaler = make_grad_scaler(device) if ctx.precision.loss_scaling else None
        trainers = {
            "peft": Trainer(peers.peer_optimizer(lora_parameters(peft_unet), cfg.lr), scaler),
            "engine": Trainer(
                make_optimizer(
                    lora_parameters(ctx.unet), cfg.lr, ctx.plan, device, weight_decay=WEIGHT_DECAY
                ),
                ctx.scaler,
            ),
        }
    variants = {
        name: Variant(name, rows, loss, trainers.get(which) if which else None)
        for name, (rows, loss, which) in variant_losses(peft_unet, ctx.unet, batch, cfg.cat_weight).items()
    }
    if cfg.cuda_graphs and device.type == "cuda":
        graphed = GraphedTrainer(
            make_optimizer(
                lora_parameters(ctx.unet),
                cfg.lr,
                ctx.plan,
                device,
                weight_decay=WEIGHT_DECAY,
                capturable=True,
            )
        )
        for name, eager in GRAPHED_VARIANTS.items():
            v = variants[eager]
            variants[name] = Variant(name, v.rows, v.loss, graphed)
    return variants, (peft_unet, ctx)


def _short(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


@contextmanager
def checkpointing_paused(unets):
    """diffusers' gradient checkpointing off inside the block (its checkpoint functions kept)."""
    flags = [
        (m, m.gradient_checkpointing)
        for u in unets
        for m in u.modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    for m, _ in flags:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.gradient_checkpointing = flag


def count_variant_flops(cfg: BenchConfig, spec: ModelSpec, resolution: int) -> tuple[dict, list[str]]:
    """FLOPs per step of each variant (forward + backward; no optimizer), counted on meta tensors."""
    flops, warnings = {}, []
    variants, _ = build_variants(cfg, spec, torch.device("meta"), resolution)
    for name, v in variants.items():
        try:
            if v.trainer is None and name == "base_forward":
                with torch.no_grad():
                    flops[name] = measure.count_flops(v.loss)
            else:
                flops[name] = measure.count_flops(lambda v=v: v.loss().backward())
        except Exception as exc:  # e.g. an op without a meta kernel: count on the device later
            flops[name] = None
            warnings.append(f"{name}: FLOPs not countable on meta ({_short(exc)}); counted on device")
    return flops, warnings


def flops_cache_key(cfg: BenchConfig, spec: ModelSpec, resolution: int) -> str:
    """What the meta counts depend on: model, shapes, LoRA, attention, library versions, and the
    engine's own source (any edit to cat_engine's Python files counts again)."""
    import diffusers
    import peft

    source = hashlib.sha256()
    package_root = Path(measure.__file__).resolve().parent.parent
    for folder in ("kernels", "engine", "cat", "bench"):
        for f in sorted((package_root / folder).rglob("*.py")):
            source.update(str(f.relative_to(package_root)).encode() + f.read_bytes())
    key = {
        "unet": spec.config,
        "resolution": resolution,
        "batch": cfg.batch,
        "rank": cfg.rank,
        "attention": cfg.attention,
        "cat_weight": cfg.cat_weight,
        "versions": [torch.__version__, diffusers.__version__, peft.__version__],
        "source": source.hexdigest(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def cached_variant_flops(cfg: BenchConfig, spec: ModelSpec, resolution: int, cache: Path | None):
    """``(flops, warnings, from the cache?)`` of :func:`count_variant_flops`, through a JSON file:
    counting a full-size model on meta is slow, and a checkpointing on/off pair of runs counts the
    same thing."""
    if cache is None:
        return (*count_variant_flops(cfg, spec, resolution), False)
    key = flops_cache_key(cfg, spec, resolution)
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        entries = {}
    if key in entries:
        return entries[key]["flops"], entries[key]["warnings"], True
    flops, warnings = count_variant_flops(cfg, spec, resolution)
    entries[key] = {"flops": flops, "warnings": warnings}
    try:
        write_text_atomically(cache, json.dumps(entries))
    except OSError:  # a read-only home: counting again next time is the only cost
        pass
    return flops, warnings, False


@dataclass
class VariantResult:
    name: str
    label: str
    rows: int
    images: int  # training images per step: B (2B for the 2B-row LoRA steps)
    times_s: list[float] = field(default_factory=list)
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    steps_per_s: float | None = None
    images_per_s: float | None = None
    flops_per_step: int | None = None
    flops_source: str | None = (
        None  # "meta", or "device" (checkpoint recompute paused: model work either way)
    )
    achieved_flops_per_s: float | None = None
    mfu: float | None = None  # against the bf16 matmul rate measured in the same run (GPU only)
    saved_bytes: int | None = None  # saved for backward, parameters excluded, deduplicated by storage
    cuda_peak_bytes: int | None = None  # torch.cuda.max_memory_allocated over a step, both UNets resident
    cuda_step_bytes: int | None = None  # the same, minus what was allocated when the step began
    nvml_used_bytes: int | None = None  # NVML device memory in use right after the step
    error: str | None = None  # the variant failed its first step: no numbers, the others still run


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ratios(results: dict[str, VariantResult]) -> dict:
    """The ratios between variants; None where a variant did not run (failed, or not selected)."""
    t = {name: None for name in (*VARIANTS, *GRAPHED_VARIANTS)} | {k: r.median_s for k, r in results.items()}
    results = {name: VariantResult(name, "", 0, 0) for name in VARIANTS} | results
    out = {
        "engine_cat_over_naive_cat_time": _ratio(t["engine_cat"], t["naive_cat"]),
        "engine_lora_over_peft_lora_time": _ratio(t["engine_lora"], t["peft_lora"]),
        "engine_cat_over_peft_lora_time": _ratio(t["engine_cat"], t["peft_lora"]),
        "engine_cat_over_engine_lora_time": _ratio(t["engine_cat"], t["engine_lora"]),
        "naive_cat_over_peft_lora_time": _ratio(t["naive_cat"], t["peft_lora"]),
        "engine_cat_over_naive_cat_saved_bytes": _ratio(
            results["engine_cat"].saved_bytes, results["naive_cat"].saved_bytes
        ),
        "engine_cat_over_engine_lora_2b_saved_bytes": _ratio(
            results["engine_cat"].saved_bytes, results["engine_lora_2b"].saved_bytes
        ),
        "engine_cat_over_naive_cat_cuda_step_bytes": _ratio(
            results["engine_cat"].cuda_step_bytes, results["naive_cat"].cuda_step_bytes
        ),
    }
    for graphed in GRAPHED_VARIANTS:
        if t[graphed] is not None:
            out[f"{graphed}_over_peft_lora_time"] = _ratio(t[graphed], t["peft_lora"])
    for who, cat, lora in (
        ("engine", "engine_cat", "engine_lora_2b"),
        ("naive", "naive_cat", "peft_lora_2b"),
    ):
        if None in (t[cat], t[lora], t["base_forward"]):
            out[f"cat_overhead_{who}_fwd"] = None
        else:
            out[f"cat_overhead_{who}_fwd"] = (t[cat] - t[lora]) / t["base_forward"]
    return out


def _warm_up(cfg: BenchConfig, variants: dict, step, warnings: list[str], log) -> tuple[list[str], dict]:
    """``(names that ran, errors by name)``: a variant that fails its first step is reported, not run."""
    names, errors = list(variants), {}
    for name in list(names):
        try:
            step(variants[name])
        except Exception as exc:
            errors[name] = _short(exc)
            names.remove(name)
            warnings.append(f"{name} failed: {errors[name]}")
            log(f"warning: {name} failed: {errors[name]}")
            traceback.print_exc()  # the whole story on stderr; the record keeps one line
            for v in variants.values():
                if v.trainer is not None:
                    v.trainer.optimizer.zero_grad(set_to_none=True)
    for _ in range(cfg.warmup - 1):
        for name in names:
            step(variants[name])
    return names, errors


def _count_on_device(names, variants, unets, autocast, flops: dict, warnings: list[str]) -> dict:
    """Count, on the device, the variants meta could not count; return each count's source."""
    source = {k: ("meta" if v is not None else None) for k, v in flops.items()}
    with checkpointing_paused(unets):  # count the model's work, not the recompute (as on meta)
        for name in names:
            if flops[name] is not None:
                continue
            v = variants[name]
            try:
                if v.trainer is None:
                    with torch.no_grad(), autocast():
                        flops[name] = measure.count_flops(v.loss)
                else:
                    flops[name] = measure.count_flops(lambda v=v: v.trainer.step(v.loss, autocast))
                source[name] = "device"
            except Exception as exc:
                warnings.append(f"{name}: FLOPs not countable ({_short(exc)})")
    return source


def _saved_bytes(names, variants, unets, autocast, warnings: list[str]) -> dict:
    """Bytes each variant's forward saves for backward, the UNets' weights excluded."""
    weights = [t for unet in unets for t in (*unet.parameters(), *unet.buffers())]
    saved = {}
    for name in names:
        v = variants[name]
        if v.trainer is None:
            saved[name] = 0  # no graph under no_grad
            continue

        def forward(v=v):
            with autocast():
                return v.loss()

        try:
            saved[name] = measure.saved_bytes(forward, exclude=weights)
        except Exception as exc:  # e.g. hooks under torch.compile
            saved[name] = None
            warnings.append(f"{name}: saved bytes not measurable ({_short(exc)})")
    return saved


def _memory_probe(memory: measure.CudaMemory, results: dict[str, VariantResult]):
    """``around`` for the timer: each variant's CUDA peak (absolute and above the step's start)
    and NVML's used memory, the highest over its timed steps."""

    @contextmanager
    def probe(name: str):
        res = results[name]
        start = memory.allocated()
        memory.reset_peak()
        yield
        peak = memory.peak_allocated()
        res.cuda_peak_bytes = max(res.cuda_peak_bytes or 0, peak)
        res.cuda_step_bytes = max(res.cuda_step_bytes or 0, peak - start)
        used = memory.nvml_used()
        if used is not None:
            res.nvml_used_bytes = max(res.nvml_used_bytes or 0, used)

    return probe


def run_bench(cfg: BenchConfig, log=print, flops_cache: Path | None = None) -> dict:
    """Run every variant interleaved; return the results record (see report.py for its use).

    ``flops_cache``: a JSON file keeping the meta-device FLOP counts between runs (None: count).
    """
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spec = resolve_model(cfg.preset)
    resolution = cfg.resolution or spec.native_resolution
    warnings: list[str] = []
    if cfg.steps < 5:
        warnings.append(f"{cfg.steps} timed steps: docs/design.md §7 asks for at least 5; medians are rough")
    if cfg.compile and device.type == "cpu":
        warnings.append(CPU_COMPILE_WARNING)
        log(f"warning: {CPU_COMPILE_WARNING}")
    if cfg.cuda_graphs:
        check_cuda_graphs(device, compile_mode=MemoryPlan(compile=cfg.compile).compile)
    with measure.torch_threads(cfg.threads if device.type == "cpu" else None):
        flops, flop_warnings, flops_cached = cached_variant_flops(cfg, spec, resolution, flops_cache)
        warnings += flop_warnings
        if cfg.cuda_graphs:  # a replay dispatches nothing to count: the eager twin's work
            flops.update({g: flops.get(e) for g, e in GRAPHED_VARIANTS.items()})
        torch.manual_seed(cfg.seed)
        variants, (peft_unet, ctx) = build_variants(
            cfg, spec, device, resolution, checkpoint_func=measure.counting_checkpoint
        )
        if cfg.variants:
            variants = {name: variants[name] for name in cfg.variants}
        unets = (peft_unet, ctx.unet)
        if cfg.compile and not compiled_modules(ctx.unet):  # the gradient check refused it
            warnings.append(
                "engine: torch.compile fell back to eager (see the warning above); peers compiled"
            )
        log(
            f"bench: {cfg.preset} at {resolution} px, batch {cfg.batch}, rank {cfg.rank}, {ctx.plan.precision}, "
            f"{cfg.attention}, checkpointing {'on' if cfg.checkpointing else 'off'}, "
            f"compile {MemoryPlan(compile=cfg.compile).compile or 'off'}, "
            f"CUDA graphs {'on' if cfg.cuda_graphs else 'off'}, on {device}; "
            f"{max(cfg.warmup, 1)} warm-up + {cfg.steps} timed steps per variant, interleaved, {cfg.clock} clock"
        )

        def step(v: Variant) -> None:
            if v.trainer is None:
                with torch.no_grad(), ctx.autocast():
                    v.loss()
            else:
                v.trainer.step(v.loss, ctx.autocast)

        names, errors = _warm_up(cfg, variants, step, warnings, log)
        flops_source = _count_on_device(names, variants, unets, ctx.autocast, flops, warnings)
        saved = _saved_bytes(names, variants, unets, ctx.autocast, warnings)
        results = {
            name: VariantResult(
                name,
                LABELS[name],
                v.rows,
                v.rows if name.endswith("_2b") else cfg.batch,
                error=errors.get(name),
            )
            for name, v in variants.items()
        }
        memory = measure.CudaMemory(device) if device.type == "cuda" else None
        if memory is not None and memory.nvml_error is not None:
            warnings.append(f"NVML unavailable: {memory.nvml_error}")
        times = measure.time_interleaved(
            {name: (lambda v=variants[name]: step(v)) for name in names},
            cfg.steps,
            device,
            clock=cfg.clock,
            threads=cfg.threads,
            around=_memory_probe(memory, results) if memory is not None else None,
        )
    matmul_rate = measure.matmul_flops_per_s(device, torch.bfloat16) if device.type == "cuda" else None
    for name in names:
        res = results[name]
        res.times_s = times[name]
        spread = measure.Spread.of(res.times_s)
        res.median_s, res.q1_s, res.q3_s, res.min_s, res.max_s = (
            spread.median,
            spread.q1,
            spread.q3,
            spread.min,
            spread.max,
        )
        res.steps_per_s = 1.0 / spread.median
        res.images_per_s = res.images / spread.median
        res.flops_per_step, res.flops_source = flops[name], flops_source[name]
        if res.flops_per_step is not None:
            res.achieved_flops_per_s = res.flops_per_step / spread.median
            if matmul_rate:
                res.mfu = res.achieved_flops_per_s / matmul_rate
        res.saved_bytes = saved[name]

    return {
        "config": {
            **asdict(cfg),
            "precision": ctx.plan.precision,
            "resolution": resolution,
            "device": str(device),
        },
        "variants": [asdict(r) for r in results.values()],
        "ratios": ratios(results),
        "matmul_bf16_flops_per_s": matmul_rate,
        "flops_cached": flops_cached,
        "warnings": warnings,
    }
