"""Pure-PyTorch references of the kernels in this package (docs/design.md §5).

Two kinds of function live here:

- ``lora_linear_reference``: the maths, differentiable by autograd, any dtype. Tests run it in
  float64 as the oracle every kernel output and gradient is compared with.
- ``lora_linear_forward`` / ``lora_linear_backward``: what the ``cat_engine::lora_linear_*``
  custom ops run on CPU tensors (and wherever Triton is not used). Same contract as the Triton
  launchers: 2-D ``x``, flat adapter-row count, low-rank products accumulated in float32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _without_autocast(fn):
    """Run an op body with autocast off: it casts explicitly, as the Triton launchers do.

    Under CPU/CUDA autocast the ``F.linear`` calls inside would otherwise be re-cast to the
    autocast dtype, so the "float32" low-rank product ``t`` would come out in bf16 and the
    backward would mix dtypes.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = args[0].device.type
        if device_type not in ("cpu", "cuda"):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


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


@_without_autocast
def lora_linear_forward(x, weight, bias, lora_A, lora_B, scale, rows, lora_x):
    """Op forward on 2-D ``x [M, K]``: returns ``y [M, N]`` (x's dtype) and ``t = xa A^T [rows, r]`` (float32)."""
    y = F.linear(x, weight, bias)
    xa = x[:rows] if lora_x is None else lora_x
    t = F.linear(xa.float(), lora_A.float())
    if rows:
        y[:rows] = (y[:rows].float() + scale * F.linear(t, lora_B.float())).to(y.dtype)
    return y, t


@_without_autocast
def lora_linear_backward(dy, x, weight, lora_A, lora_B, t, scale, rows, lora_x, need_dx):
    """Op backward on 2-D tensors: ``(dx or None, dA, dB, d lora_x or None)``.

    ``u = dy_a B``; ``dB = scale * dy_a^T t``; ``dA = scale * u^T xa``;
    ``dx = dy W`` plus ``scale * u A`` on the adapter rows (or, with ``lora_x``, that term is
    ``lora_x``'s gradient instead).
    """
    dy_a = dy[:rows].float()
    xa = (x[:rows] if lora_x is None else lora_x).float()
    u = dy_a @ lora_B.float()
    d_lora_B = (scale * (dy_a.t() @ t)).to(lora_B.dtype)
    d_lora_A = (scale * (u.t() @ xa)).to(lora_A.dtype)
    low = scale * (u @ lora_A.float())
    dx = None
    if need_dx:
        dx = dy @ weight
        if lora_x is None and rows:
            dx[:rows] = (dx[:rows].float() + low).to(dx.dtype)
    d_lora_x = low.to(lora_x.dtype) if lora_x is not None else None
    return dx, d_lora_A, d_lora_B, d_lora_x
