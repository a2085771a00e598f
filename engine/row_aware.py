"""Which layers may carry an adapter inside a split batch, and the refusals for everything else.

A split-batch call (docs/design.md §4) gives the LoRA delta to the leading ``adapter_rows`` rows only;
the rows after them are the frozen base model's. A layer that ignores that count puts its delta on
the base rows too, and then the CAT term compares the adapter with itself: it comes out near zero,
silently. So before a split batch runs, every trainable parameter must sit in a layer that honours
the count, and no module may have had its ``forward`` replaced by something that does not.

Layers that honour it:

* the engine's fused peft layers (``fuse_lora``: :class:`~cat_engine.engine.fused_lora.FusedLoraLinear`);
* any class registered with :func:`register_row_aware`. The protocol for such a layer:

  - read ``split_state(model).adapter_rows`` at call time (keep the object: it is shared and
    mutated in place, never replaced). ``None``: every row gets the delta. ``k``: only rows
    ``0 .. k-1`` of dim 0 get it; ``0``: no row does (the frozen layer alone);
  - draw random numbers (dropout) for the adapter rows only, so that a checkpointed unit that is
    recomputed on its adapter rows draws the same masks again;
  - a layer that works by replacing another module's ``forward`` (kohya-style) must do so with a
    bound method of a registered instance, so that the replacement is recognised as row-aware.

peft's own LoRA layers, left unfused, do not read the count; ``cat_loss`` runs its three-call
reference for them (peft's ``disable_adapters`` gives the base rows), and ``split_batch_call``
refuses them (see ``engine/split_unet.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

from cat_engine.engine.errors import CatEngineError

_ROW_AWARE: list[type] = []
_VERIFIED: ContextVar[int | None] = ContextVar("cat_engine_verified_model", default=None)
# Class names of the wrappers that hide the model a split batch needs (DDP, FSDP 1 and 2, DataParallel).
_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "FSDPModule")


class SplitBatchError(CatEngineError):
    """A model that the split batch cannot run correctly; the message says what to do instead."""


def register_row_aware(cls: type) -> type:
    """Declare that instances of ``cls`` honour ``split_state(model).adapter_rows`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"register_row_aware expects an nn.Module subclass, got {cls!r}")
    if cls not in _ROW_AWARE:
        _ROW_AWARE.append(cls)
    return cls


def _row_aware_classes() -> tuple[type, ...]:
    from cat_engine.engine.fused_lora import FusedLoraLinear

    return (FusedLoraLinear, *_ROW_AWARE)


def is_row_aware(module) -> bool:
    """True for the engine's fused layers and instances of registered row-aware classes."""
    return isinstance(module, _row_aware_classes())


def _peft_lora_layer():
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # peft absent: there can be no peft layers
        return None
    return LoraLayer


def _row_aware_forward(module) -> bool:
    owner = getattr(module.__dict__.get("forward"), "__self__", None)
    return owner is not None and owner is not module and is_row_aware(owner)


def adapter_module_ids(model: torch.nn.Module) -> set[int]:
    """Ids of the modules whose rows differ between adapter and base rows (a module containing
    one of them does too).

    Modules holding LoRA tensors by name (``lora_``, frozen ones included: sampling with a loaded
    adapter) or trainable tensors, row-aware layers, and modules whose ``forward`` a row-aware
    layer replaced (kohya-style: the adapter's tensors live outside the model).
    """
    ids = set()
    for module in model.modules():
        own = module.named_parameters(recurse=False)
        if (
            is_row_aware(module)
            or _row_aware_forward(module)
            or any("lora_" in n or p.requires_grad for n, p in own)
        ):
            ids.add(id(module))
    return ids


def wrapper_name(model) -> str | None:
    """The class name of a data-parallel wrapper around ``model`` (DDP, FSDP, DataParallel), else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in _WRAPPERS:
            return cls.__name__
    return None


def check_bare_model(model, caller: str) -> None:
    """Refuse a data-parallel wrapper: the split batch needs the model itself (its split state,
    its modules), and gradient sync must come from a wrapper around the loss instead."""
    name = wrapper_name(model)
    if name is not None:
        raise SplitBatchError(
            f"{caller}: got a UNet wrapped in {name}; pass the bare UNet and get gradient sync from "
            "cat_engine.cat.data_parallel_cat_loss(unet) (or wrap cat_engine.cat.CatLoss(unet) in DDP / "
            "accelerator.prepare) instead of wrapping the UNet"
        )


def _known_layers() -> tuple[type, ...]:
    peft_layer = _peft_lora_layer()
    return (*_row_aware_classes(), *((peft_layer,) if peft_layer else ()))


def _foreign_forward(name: str, module) -> str | None:
    """Why ``module``'s replaced ``forward`` is not acceptable, or None when it is."""
    forward = module.__dict__.get("forward")
    if forward is None or hasattr(module, "_hf_hook"):  # accelerate's device hooks move tensors only
        return None
    if _row_aware_forward(module):
        return None
    what = getattr(forward, "__qualname__", type(forward).__name__)
    return (
        f"{name}.forward is replaced by {what}, which does not read adapter_rows (a kohya-style LoRA?): "
        "the base rows would carry the adapter"
    )


def adapter_layer_problem(model: torch.nn.Module) -> str | None:
    """What makes ``model`` unfit for a split batch, in one line; ``None`` when nothing does.

    Checked, in one pass over the modules: a submodule whose ``forward`` was replaced by something
    that is not row-aware, and a trainable parameter outside every LoRA layer the engine knows
    (fused, registered row-aware, or peft's).
    """
    known = _known_layers()
    inside: set[int] = set()  # modules within a known layer (named_modules visits parents first)
    for name, module in model.named_modules():
        if name:  # the root's own forward may be wrapped (accelerate's autocast): it is not a layer
            problem = _foreign_forward(name, module)
            if problem:
                return problem
        if isinstance(module, known):
            inside.update(id(m) for m in module.modules())
        if id(module) in inside:
            continue
        for param_name, p in module._parameters.items():
            if p is not None and p.requires_grad:
                full = f"{name}.{param_name}" if name else param_name
                return (
                    f"trainable parameter {full} is not part of a LoRA layer the split batch knows: the frozen "
                    "base rows would use it too"
                )
    return None


@contextmanager
def verified(model: torch.nn.Module):
    """Within the block, :func:`check_adapter_layers` of ``model`` passes without a second walk
    (for a caller that has just checked it and calls into code that checks again)."""
    token = _VERIFIED.set(id(model))
    try:
        yield
    finally:
        _VERIFIED.reset(token)


def check_adapter_layers(model: torch.nn.Module, caller: str) -> None:
    """Raise :class:`SplitBatchError` when :func:`adapter_layer_problem` finds something."""
    if _VERIFIED.get() == id(model):
        return
    problem = adapter_layer_problem(model)
    if problem is not None:
        raise SplitBatchError(
            f"{caller}: {problem}; train the adapter as peft LoRA (unet.add_adapter(LoraConfig(...)) then "
            "cat_engine.engine.fuse_lora(unet)), freeze everything else, or make your layer row-aware "
            "(cat_engine.engine.register_row_aware)"
        )
