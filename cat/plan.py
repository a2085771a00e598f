"""``cat-engine plan``: predict peak VRAM of a CAT training step and pick the fastest plan that fits.

    cat-engine plan --base sd15 --resolution 512 --vram-budget 8GB
    cat-engine plan --base flux --resolution 1024 --vram-budget 12GB

Prints every candidate plan (fastest first) with its predicted peak and whether it fits, then the
chosen one. ``cat-engine train --vram-budget`` applies the same choice (:func:`parse_bytes` and
``cat_engine.engine.vram.best_plan``).
"""

from __future__ import annotations

import re

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.optimizers import OPTIMIZERS

BYTES_HELP = (
    "a size such as 8GB, 8GiB, 12G, 8000MB or a plain number of bytes. Units are binary: "
    "K/KB/KiB = 2^10, M/MB/MiB = 2^20, G/GB/GiB = 2^30, T/TB/TiB = 2^40 bytes, because GPU memory "
    "is sized that way (an '8 GB' card has 8192 MiB, as nvidia-smi shows)"
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """Parse a memory size; ``GB``, ``G`` and ``GiB`` all mean 2^30 bytes (see :data:`BYTES_HELP`).

    Raises ``ValueError`` with the accepted forms for anything else, or for a size of zero.
    """
    match = _SIZE.match(str(text))
    if not match or (match.group(3).lower() == "i"):  # "8Gi" without the B is not a unit we accept
        raise ValueError(f"cannot read {text!r} as a memory size: {BYTES_HELP}")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--base",
        default="builtin",
        help="full-size configs: sd15, sd21, sdxl, flux, flux-schnell, sd3-medium, sd35-medium, sd35-large, "
        "zimage; builtin, builtin-tiny-<family>, or a diffusers folder",
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="image side in pixels (default: the model's)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--vram-budget", default=None, help=f"GPU memory to fit into: {BYTES_HELP}")
    parser.add_argument(
        "--cat-weight",
        type=float,
        default=1.0,
        help="CAT lambda; 0 estimates plain LoRA training (default 1.0)",
    )
    parser.add_argument(
        "--half",
        choices=("bf16", "fp16"),
        default="bf16",
        help="half precision to plan with (fp16 on GPUs without bf16)",
    )
    parser.add_argument("--attention", choices=("sdpa", "xformers"), default="sdpa", help="attention backend")
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="optimizer whose state is counted (default adamw)",
    )


ORDER = {
    False: "half precision before fp32, no checkpointing before checkpointing",
    True: "no checkpointing, checkpointing, then with checkpointing: block offloading, int8 frozen weights, both",
}


def _row(rank, plan, est, budget, chosen) -> str:
    from cat_engine.engine.vram import format_bytes

    fits = "-" if budget is None else ("yes" if est.fits(budget) else "no")
    mark = "  <- chosen" if chosen else ""
    host = format_bytes(est.offloaded) if est.offloaded else "-"
    return (
        f"{rank:<3} {plan.describe():<28} {format_bytes(est.weights):>10} {format_bytes(est.lora + est.grads + est.optimizer):>10} "
        f"{format_bytes(est.activations):>11} {format_bytes(est.workspace):>10} {format_bytes(est.total):>10} "
        f"{host:>10} {fits:>5}{mark}"
    )


def train_flags(plan) -> str:
    """The ``cat-engine train`` flags that run ``plan``."""
    flags = f"--precision {plan.precision} --attention {plan.attention}"
    if plan.gradient_checkpointing:
        flags += " --gradient-checkpointing"
    if plan.frozen_quant != "none":
        flags += f" --frozen-quant {plan.frozen_quant}"
    if plan.offload:
        flags += " --offload"
    return flags


def run(args) -> int:
    from cat_engine.cat.loss import step_loss
    from cat_engine.engine import quantize, vram

    try:
        spec = vram.resolve_model(args.base)
    except ValueError as exc:
        raise CatEngineError(str(exc)) from None
    budget = None
    if args.vram_budget is not None:
        try:
            budget = parse_bytes(args.vram_budget)
        except ValueError as exc:
            raise CatEngineError(f"--vram-budget: {exc}") from None
    for name in ("batch_size", "rank"):
        if getattr(args, name) < 1:
            raise CatEngineError(f"--{name.replace('_', '-')} must be >= 1")
    resolution = args.resolution or spec.native_resolution
    if resolution < 1 or resolution % spec.pixel_multiple:
        raise CatEngineError(
            f"--resolution must be a positive multiple of {spec.pixel_multiple}, got {resolution}"
        )
    cat = args.cat_weight != 0
    loss_fn = step_loss(args.cat_weight)  # the step `cat-engine train` runs, measured on the meta device

    candidates = vram.plan_candidates(
        spec,
        resolution,
        args.batch_size,
        args.rank,
        loss_fn=loss_fn,
        half=args.half,
        attention=args.attention,
        optimizer=args.optimizer,
    )
    chosen, failure = None, None
    if budget is not None:
        try:  # the same choice `cat-engine train --vram-budget` makes (estimates are cached)
            chosen = vram.best_plan(
                spec,
                resolution,
                args.batch_size,
                budget,
                args.rank,
                loss_fn=loss_fn,
                half=args.half,
                attention=args.attention,
                optimizer=args.optimizer,
            )
        except vram.NoPlanFits as exc:
            failure = str(exc)

    what = "CAT" if cat else "plain LoRA (cat weight 0)"
    print(f"{spec.name}: {resolution} px, batch {args.batch_size}, LoRA rank {args.rank}, {what}")
    if budget is not None:
        print(
            f"budget {vram.format_bytes(budget)} ({args.vram_budget}); a plan fits when its peak plus "
            f"{vram.format_bytes(vram.CUDA_CONTEXT_RESERVE)} for the CUDA context is within it"
        )
    print(f"plans fastest first ({ORDER[spec.family is not None]})")
    print(
        f"{'#':<3} {'plan':<28} {'weights':>10} {'lora+opt':>10} {'activations':>11} {'workspace':>10} {'peak':>10} "
        f"{'CPU RAM':>10} {'fits':>5}"
    )
    for i, (plan, est) in enumerate(candidates):
        print(_row(i + 1, plan, est, budget, chosen is not None and plan == chosen[0]))
    if spec.family is not None and quantize.torchao_problem() is not None:
        print(f"(no int8 plans: {quantize.torchao_problem()})")
    print(
        "peak = predicted torch.cuda.max_memory_allocated; activations measured on the meta device; "
        "CPU RAM = frozen weights offloaded (pinned host memory)"
    )
    if failure is not None:
        raise CatEngineError(failure)
    if chosen is None:
        return 0
    plan, est = chosen
    print(
        f"chosen: {plan.describe()}, predicted peak {vram.format_bytes(est.total)} "
        f"(train flags: {train_flags(plan)})"
    )
    return 0
