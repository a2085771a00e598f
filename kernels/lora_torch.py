"""The cuBLAS-first LoRA linear: the default path of :func:`cat_engine.kernels.lora_linear`
(docs/design.md §5).

For ``x [M, K]`` (``M`` flat rows, the first ``Ma`` of them adapter rows), rank ``r``:

Forward:
    y    = x Wᵀ + b                                 addmm       (cuBLAS, every row)
    t    = x_a Aᵀ                                   mm          [Ma, r]
    y_a += scale · t Bᵀ                             addmm_      into the adapter-rows view of y
Backward:
    u    = dy_a B                                   mm          [Ma, r]
    dx   = dy W                                     mm          (when x needs a gradient)
    dx_a += scale · u A                             addmm_      (d lora_x instead, with dropout)
    dB   = scale · dy_aᵀ t                          addmm, beta=0
    dA   = scale · uᵀ x_a                           addmm, beta=0

Nothing is copied: the delta is accumulated in place into the rows of ``y`` (and of ``dx``) that
carry it, the scale rides on ``alpha``, and only ``x_a`` (a view of ``x``, which peft's layer keeps
alive too) and ``t`` are saved. Every product runs in the compute dtype: ``x``'s, which the caller
has already set to autocast's (the LoRA weights are cast to it, as autocast casts them for peft);
the gradients of ``A`` and ``B`` are returned in their own dtype.

A plain :class:`torch.autograd.Function` of ATen ops: little host work per call, any device
(CPU, CUDA, meta), and ``torch.compile`` traces straight through it.
"""

from __future__ import annotations

import torch


class TorchLoraLinear(torch.autograd.Function):
    """``apply(x, weight, bias, lora_A, lora_B, scale, rows, lora_x)``.

    ``x``: ``[batch, ..., K]`` in the compute dtype, ``weight``/``bias`` in it too; ``rows``: adapter
    rows counted in flat rows (``x.reshape(-1, K)``), at least 1; ``lora_x``: ``None`` or the
    dropped-out input of the low-rank branch, ``[rows, K]``. Returns ``[batch, ..., N]``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, rows, lora_x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2.mm(weight.t())
        dt = x.dtype
        a = lora_A if lora_A.dtype == dt else lora_A.to(dt)
        b = lora_B if lora_B.dtype == dt else lora_B.to(dt)
        if lora_x is not None:
            xa = lora_x
        else:
            xa = x2 if rows == x2.shape[0] else x2[:rows]
        t = xa.mm(a.t())
        (y if rows == y.shape[0] else y[:rows]).addmm_(t, b.t(), alpha=scale)
        ctx.save_for_backward(xa, t, weight, a, b)
        ctx.meta = (scale, shape, lora_x is not None, lora_A.dtype, lora_B.dtype)
        return y.view(*shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, dy):
        xa, t, weight, a, b = ctx.saved_tensors
        scale, x_shape, dropout, dtype_a, dtype_b = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        rows = t.shape[0]
        dy_a = dy2 if rows == dy2.shape[0] else dy2[:rows]
        u = dy_a.mm(b)
        need = ctx.needs_input_grad
        dx = d_lora_x = None
        if dropout:
            if need[7]:
                d_lora_x = torch.addmm(xa, u, a, beta=0, alpha=scale)
            if need[0]:
                dx = dy2.mm(weight).view(x_shape)
        elif need[0]:
            dx2 = dy2.mm(weight)
            (dx2 if rows == dx2.shape[0] else dx2[:rows]).addmm_(u, a, alpha=scale)
            dx = dx2.view(x_shape)
        # beta=0: the first argument only gives the shape and dtype; its values are ignored.
        d_a = torch.addmm(a, u.t(), xa, beta=0, alpha=scale) if need[3] else None
        d_b = torch.addmm(b, dy_a.t(), t, beta=0, alpha=scale) if need[4] else None
        if d_a is not None and d_a.dtype != dtype_a:
            d_a = d_a.to(dtype_a)
        if d_b is not None and d_b.dtype != dtype_b:
            d_b = d_b.to(dtype_b)
        return dx, None, None, d_a, d_b, None, None, d_lora_x


def _register_addmm_inplace_flops():
    """FlopCounterMode knows ``addmm`` but not the in-place ``addmm_`` this path accumulates the
    delta with; count it as the same product (registration is global, once per process)."""
    from torch.utils import flop_counter

    target = torch.ops.aten.addmm_
    if target not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(target)(
            lambda self_shape, a_shape, b_shape, out_shape=None, **kw: flop_counter.mm_flop(a_shape, b_shape)
        )


_register_addmm_inplace_flops()
