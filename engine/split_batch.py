"""Split-batch state of a UNet: how many leading rows of the next call get the LoRA delta.

docs/design.md §4: rows are ordered adapter rows first (token rows, then plain rows) and base rows
last. Every LoRA layer applies its delta to the first ``adapter_rows`` rows of dim 0 only; every
frozen op runs all rows together. ``None`` means every row is an adapter row (a plain LoRA call).

The state is one small object stored on the UNet and shared by reference with every fused LoRA
layer, so setting it costs nothing per layer and needs no module traversal per call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

STATE_ATTR = "_cat_split_state"


@dataclass
class SplitBatchState:
    """Mutable per-UNet state read by the fused LoRA layers at call time."""

    adapter_rows: int | None = None  # None: all rows carry the adapter


def split_state(unet: torch.nn.Module) -> SplitBatchState:
    """Return the UNet's split-batch state, creating it (all rows adapter rows) on first use."""
    state = getattr(unet, STATE_ATTR, None)
    if state is None:
        state = SplitBatchState()
        # object.__setattr__ so nn.Module does not try to register it as a submodule/buffer.
        object.__setattr__(unet, STATE_ATTR, state)
    return state


@contextmanager
def adapter_rows(unet: torch.nn.Module, rows: int | None):
    """Within the block, only the first ``rows`` rows of each UNet call get the LoRA delta.

    ``rows=0`` runs the frozen base model on every row; ``None`` restores "all rows".
    Nested uses restore the outer value on exit.
    """
    if rows is not None and rows < 0:
        raise ValueError(f"adapter_rows must be >= 0 or None, got {rows}")
    state = split_state(unet)
    previous = state.adapter_rows
    state.adapter_rows = rows
    try:
        yield state
    finally:
        state.adapter_rows = previous
