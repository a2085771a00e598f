"""Deterministic cost accounting of a training step on CPU: FLOPs and bytes saved for backward.

docs/design.md §7. Used by the split-batch accounting tests and ``bench/split_overhead.py``.

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` around forward *and* backward.
* Saved bytes: every tensor autograd packs for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), plus the inputs that gradient checkpointing keeps
  alive for its recompute (torch's non-reentrant checkpoint holds them by reference, not through the
  hooks; :func:`counting_checkpoint` records them). Counted once per storage, by the storage's full
  size (a saved view keeps its whole base alive), parameters and their views excluded.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

_active: list[SavedBytes] = []


class SavedBytes:
    """Unique non-parameter storages saved for backward while the context is active."""

    def __init__(self, module: torch.nn.Module | None = None):
        self.parameter_ptrs = set()
        if module is not None:
            self.parameter_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.storages: dict[int, int] = {}

    def add(self, t: torch.Tensor):
        if not torch.is_tensor(t) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.parameter_ptrs or ptr == 0:
            return
        self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @contextmanager
    def recording(self):
        def pack(t):
            self.add(t)
            return t

        _active.append(self)
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield self
        finally:
            _active.remove(self)


def counting_checkpoint(module, *args):
    """diffusers' default checkpoint function (torch, non-reentrant), recording the inputs it keeps."""
    for recorder in _active:
        for a in args:
            recorder.add(a)
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def saved_bytes(forward, module: torch.nn.Module | None = None) -> int:
    """Bytes saved for backward by ``forward()`` (called once; its result is dropped)."""
    recorder = SavedBytes(module)
    with recorder.recording():
        out = forward()
    del out
    return recorder.total


def step_flops(step) -> int:
    """FLOPs of ``step()`` (forward and backward), counted by ``FlopCounterMode``."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()
