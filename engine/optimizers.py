"""The optimizers and learning-rate schedules a LoRA run can use, each from the library that has it.

- ``adamw``: ``torch.optim.AdamW`` (fused on CUDA: :func:`cat_engine.engine.memory_plan.make_optimizer`);
- ``adamw8bit``: bitsandbytes' ``AdamW8bit`` (8-bit block-quantised moments; optional extra
  ``cat-engine[adamw8bit]``);
- ``prodigy``: prodigyopt's ``Prodigy`` (estimates the step size itself; used with ``lr`` 1;
  optional extra ``cat-engine[prodigy]``).

Schedules are diffusers' ``get_scheduler`` functions (constant, cosine, cosine_with_restarts,
polynomial, linear) after a linear warm-up that starts at ``1 / warmup`` of the rate, so the first
step already learns (diffusers' own warm-up starts at 0).

:func:`state_bytes` is what each optimizer keeps per trained tensor, for the VRAM planner.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cat_engine.engine.errors import CatEngineError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
LR_SCHEDULERS = ("constant", "cosine", "cosine_with_restarts", "polynomial", "linear")
# The package each optimizer needs beyond torch, and the extra that installs it.
PACKAGES = {"adamw8bit": ("bitsandbytes", "adamw8bit"), "prodigy": ("prodigyopt", "prodigy")}
# bitsandbytes keeps 32-bit moments for tensors smaller than this (its ``min_8bit_size``), and
# one fp32 absmax per block of this many elements for the others; qmaps are 256 fp32 values.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP = 256


class OptimizerUnavailable(CatEngineError):
    """An optimizer whose package is not installed; the message says what to install."""


def _import(name: str):
    package, extra = PACKAGES[name]
    try:
        return __import__(package)
    except ImportError:
        raise OptimizerUnavailable(
            f"--optimizer {name} needs {package}, which is not installed: pip install 'cat-engine[{extra}]'"
        ) from None


def make_extra_optimizer(name: str, params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adamw8bit`` or ``prodigy`` over ``params`` (AdamW is built by the memory plan, fused where it can be)."""
    if name == "adamw8bit":
        bnb = _import(name)
        return bnb.optim.AdamW8bit(list(params), lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        prodigyopt = _import(name)
        return prodigyopt.Prodigy(list(params), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def state_bytes(name: str, numel: int) -> list[int]:
    """The bytes of each state tensor ``name`` keeps for one trained fp32 tensor of ``numel`` elements.

    Step counters are not counted: Python numbers (bitsandbytes, Prodigy) or a one-element tensor
    (AdamW; on the GPU only when fused, one 512-byte block a tensor).
    """
    if name == "adamw":
        return [4 * numel, 4 * numel]  # exp_avg, exp_avg_sq
    if name == "adamw8bit":
        if numel < BNB_MIN_8BIT_SIZE:
            return [4 * numel, 4 * numel]
        blocks = math.ceil(numel / BNB_BLOCK)
        return [numel, numel, 4 * BNB_QMAP, 4 * BNB_QMAP, 4 * blocks, 4 * blocks]
    if name == "prodigy":
        return [4 * numel] * 4  # exp_avg, exp_avg_sq, s, p0 (the initial weights)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def lr_factor(
    name: str, warmup_steps: int, total_steps: int, lr: float, num_cycles: int = 1, power: float = 1.0
) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` (from 0): a linear warm-up from ``1 / warmup_steps``
    to 1 over ``warmup_steps`` steps, then diffusers' schedule ``name`` as ``get_scheduler`` makes it."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise ValueError(f"lr scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {name!r}")
    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"  # diffusers' "constant" ignores the warm-up
    # A stand-in optimizer with the real rate: the polynomial schedule reads it (it decays to lr_end).
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    kwargs = {"num_cycles": num_cycles} if name == "cosine_with_restarts" else {}
    if name == "polynomial":
        kwargs["power"] = power
    after = get_scheduler(
        name, probe, num_warmup_steps=warmup_steps, num_training_steps=total_steps, **kwargs
    ).lr_lambdas[0]

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if step < warmup_steps else after(step)

    return factor


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    warmup_steps: int,
    total_steps: int,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor`; its ``state_dict`` holds no function (rebuilt on resume)."""
    group = optimizer.param_groups[0]
    lr = group.get("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(name, warmup_steps, total_steps, lr, num_cycles, power)
    )
