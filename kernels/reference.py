"""Pure-PyTorch reference of the LoRA linear (docs/design.md §5): the maths, differentiable by
autograd, any dtype. Tests run it in float64 as the oracle every path's output and gradients are
compared with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scale, adapter_rows=None, lora_x=None):
    """``x W^T + b`` on every row plus ``scale * (x A^T) B^T`` on the first ``adapter_rows`` rows of dim 0.

    ``lora_x`` (shape ``[adapter_rows, ..., K]``), when given, replaces ``x[:adapter_rows]`` as the
    input of the low-rank branch (the dropped-out input). The delta is computed in the LoRA
    weights' dtype and added in it, then cast back, as peft does for float32 adapters on
    half-precision models.
    """
    y = F.linear(x, weight, bias)
    rows = x.shape[0] if adapter_rows is None else adapter_rows
    if rows == 0:
        return y
    xa = x[:rows] if lora_x is None else lora_x
    delta = F.linear(F.linear(xa.to(lora_A.dtype), lora_A), lora_B) * scale
    head = (y[:rows].to(delta.dtype) + delta).to(y.dtype)
    return torch.cat([head, y[rows:]], dim=0)
