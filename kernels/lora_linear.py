"""Fused LoRA linear for split batches: ``y = x W^T + b`` on every row, plus the low-rank delta
``scale * (x A^T) B^T`` on the first ``adapter_rows`` rows only (docs/design.md §4, §5).

Layout of this file: Triton kernels (maths in their docstrings), launchers (shape and dtype
checks, block choices), the custom ops with their fake implementations, autograd and FLOP
formulas, and the public :func:`lora_linear`.

Forward (``M`` flat rows, ``Ma`` adapter rows, ``r`` rank):
    t = xa A^T                                      [Ma, r]  fp32   (_lowrank_kernel)
    y = x W^T + b + [m < Ma] * scale * t B^T        [M, N]          (_fused_lora_xw_sb_kernel,
                                                                     accumulator seeded with t B^T)
Backward:
    u  = dy_a B                                     [Ma, r]  fp32   (_lowrank_kernel)
    dB = scale * dy_a^T t                           [N, r]          (_lora_weight_grad_kernel)
    dA = scale * u^T xa                             [r, K]          (_lora_weight_grad_kernel)
    dx = dy W + [m < Ma] * scale * u A              [M, K]          (_fused_lora_xw_sb_kernel)
Only adapter rows enter ``t``, ``u``, ``dA`` and ``dB``; base rows cost exactly a frozen linear.

Dispatch, read at call time: CUDA tensors run the Triton kernels; CPU tensors run
``kernels/reference.py``, unless ``CAT_ENGINE_FORCE_TRITON=1``, which sends them to the Triton
kernels too. On CPU that needs ``TRITON_INTERPRET=1``. Triton decorates its own jitted helpers
(``tl.zeros``, ``tl.cdiv`` ...) once, at import, in the mode the environment then says, and torch,
peft and diffusers import triton early; so the kernels here use only core builtins (``tl.full``,
plain integer division) and are decorated lazily, per setting, at launch. The variable is then
honoured whenever it is set before the launch (tests/kernels/conftest.py sets it up front anyway).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import math
import os

import torch

from cat_engine.kernels import reference

# Imported on first launch (_load_triton), not here: importing triton fixes its interpreter mode
# for the whole process, and the package must import where triton is absent (non-Linux).
triton = None
tl = None

FORCE_TRITON_ENV = "CAT_ENGINE_FORCE_TRITON"
MAX_RANK = 128
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Kernels. Plain functions, jitted on first launch by _jit() (see module docstring); their
# ``tl.constexpr`` annotations stay strings (postponed annotations), which triton reads as such.
# No triton.language.standard helpers (tl.zeros, tl.cdiv): those are jitted at triton's import in
# one mode and break the interpreter when TRITON_INTERPRET was set later.
# ----------------------------------------------------------------------------------------------


def _lowrank_kernel(
    X, L, OUT, M, K, R,
    stride_xm, stride_xk, stride_lk, stride_lr, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[m, r] = sum_k X[m, k] L[k, r]  for m < M, r < R (R <= BLOCK_R); OUT float32.

    One program per BLOCK_M rows; the whole (padded) rank fits in one tile. Dot operands are
    X's dtype (L is cast to it), accumulation is float32.
    """
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        lt = tl.load(L + kk[:, None] * stride_lk + rr[None, :] * stride_lr,
                     mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
        if UPCAST:  # interpreter: tl.dot on bf16 is wrong there (docs/design.md §5)
            acc += tl.dot(x.to(tl.float32), lt.to(tl.float32))
        else:
            acc = tl.dot(x, lt.to(x.dtype), acc, input_precision=PRECISION)
    tl.store(OUT + rm[:, None] * stride_om + rr[None, :] * stride_or, acc,
             mask=(rm[:, None] < M) & (rr[None, :] < R))


def _fused_lora_xw_sb_kernel(
    X, W, BIAS, S, L, OUT, M, N, K, R, ROWS, scale,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_sm, stride_sr, stride_lr, stride_ln,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[m, n] = sum_k X[m, k] W[k, n] + BIAS[n] + [m < ROWS] * scale * sum_r S[m, r] L[r, n].

    ``XW + S·B`` with the low-rank term first: tiles holding adapter rows start their float32
    accumulator at ``scale * S_tile @ L_tile`` (rows past ROWS masked to zero), then the K loop of
    ``X W`` runs into it, so the delta costs one small dot per tile and no extra pass over OUT.
    Tiles wholly past ROWS skip it. Forward: X=x, W=W^T, S=t, L=B^T. Backward: X=dy, W=W, S=u, L=A.
    Programs are ordered in groups of GROUP_M row tiles so neighbouring programs share W tiles in L2.
    """
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)

    if pid_m * BLOCK_M < ROWS:
        rr = tl.arange(0, BLOCK_R)
        s = tl.load(S + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=(rm[:, None] < ROWS) & (rr[None, :] < R), other=0.0)
        lo = tl.load(L + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
                     mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            acc = tl.dot(s.to(tl.float32), lo.to(tl.float32)) * scale
        else:
            dt = X.dtype.element_ty
            acc = tl.dot(s.to(dt), lo.to(dt), acc, input_precision=PRECISION) * scale

    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W + kk[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(OUT.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def _lora_weight_grad_kernel(
    U, V, OUT, ROWS, P, Q, ROWS_PER_SPLIT,
    stride_um, stride_up, stride_vm, stride_vq, stride_os, stride_op, stride_oq,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """OUT[s, p, q] = sum_{m in split s, m < ROWS} U[m, p] V[m, q]  (float32 partial sums).

    The reduction runs over the (long) row dimension, so it is split into chunks of
    ROWS_PER_SPLIT rows (a multiple of BLOCK_M), one per grid axis-2 program, to fill the GPU;
    the launcher sums the partials. Operands are cast to U's dtype for the dot (tensor cores on
    half inputs), accumulation is float32. dB: U=dy_a, V=t. dA: U=u, V=xa.
    """
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    pid_s = tl.program_id(2)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rb = tl.arange(0, BLOCK_M)
    start = pid_s * ROWS_PER_SPLIT
    end = min(start + ROWS_PER_SPLIT, ROWS)
    acc = tl.full((BLOCK_P, BLOCK_Q), 0.0, tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = (m0 + rb).to(tl.int64)
        u = tl.load(U + rm[:, None] * stride_um + rp[None, :] * stride_up,
                    mask=(rm[:, None] < end) & (rp[None, :] < P), other=0.0)
        v = tl.load(V + rm[:, None] * stride_vm + rq[None, :] * stride_vq,
                    mask=(rm[:, None] < end) & (rq[None, :] < Q), other=0.0)
        if UPCAST:
            acc += tl.dot(tl.trans(u.to(tl.float32)), v.to(tl.float32))
        else:
            acc = tl.dot(tl.trans(u), v.to(u.dtype), acc, input_precision=PRECISION)
    tl.store(OUT + pid_s * stride_os + rp[:, None] * stride_op + rq[None, :] * stride_oq, acc,
             mask=(rp[:, None] < P) & (rq[None, :] < Q))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_JITTED: dict = {}


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load_triton():
    global triton, tl
    if triton is None:
        if not _triton_installed():
            raise RuntimeError("lora_linear: Triton is not installed; CPU tensors use the reference path")
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _jit(fn):
    """The jitted kernel for the current TRITON_INTERPRET setting (decorated once per setting)."""
    key = (fn.__name__, _interpreting())
    if key not in _JITTED:
        _JITTED[key] = triton.jit(fn)
    return _JITTED[key]


def _empty(shape, dtype, device):
    """Every buffer a kernel writes is allocated here (tests swap in NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rank_block(r: int) -> int:
    # tl.arange needs a power of two and tl.dot a dimension >= 16 on a GPU.
    return max(16, triton.next_power_of_2(r))


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs follow PyTorch's own matmul setting (TF32 off by default).
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check_launch(x: torch.Tensor, *others: torch.Tensor):
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"lora_linear: Triton kernels got {x.device.type} tensors without TRITON_INTERPRET=1; "
            f"set it before triton is imported, or unset {FORCE_TRITON_ENV}"
        )
    _load_triton()
    for t in others:
        if t.device != x.device:
            raise ValueError(f"lora_linear: tensors on different devices ({x.device} and {t.device})")


def lowrank(x: torch.Tensor, lora_t: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ lora_t [K, R]`` -> float32 ``[M, R]``, ``R <= 128``; ``lora_t`` may be a transposed view."""
    if x.dim() != 2 or lora_t.dim() != 2 or x.shape[1] != lora_t.shape[0]:
        raise ValueError(f"lowrank: expected x [M, K] and L [K, R], got {tuple(x.shape)} and {tuple(lora_t.shape)}")
    if not 1 <= lora_t.shape[1] <= MAX_RANK:
        raise ValueError(f"lowrank: rank must be in 1..{MAX_RANK}, got {lora_t.shape[1]}")
    _check_launch(x, lora_t)
    (M, K), R = x.shape, lora_t.shape[1]
    out = _empty((M, R), torch.float32, x.device)
    if M == 0:
        return out
    block_m = 64
    _jit(_lowrank_kernel)[(triton.cdiv(M, block_m),)](
        x, lora_t, out, M, K, R, x.stride(0), x.stride(1), lora_t.stride(0), lora_t.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_K=32, BLOCK_R=_rank_block(R), UPCAST=_interpreting(),
        PRECISION=_dot_precision(x.dtype), num_warps=4,
    )
    return out


def fused_lora_xw_sb(x, w_t, bias, s, lora_t, rows: int, scale: float) -> torch.Tensor:
    """``x [M, K] @ w_t [K, N] + bias [N] + scale * s [rows, R] @ lora_t [R, N]`` on rows < ``rows``.

    ``x``, ``w_t``, ``bias`` share a float dtype (the output's); ``s`` is float32; ``lora_t`` any
    float dtype. Views with any strides are fine (forward passes ``W.t()``, ``B.t()``).
    """
    if x.dim() != 2 or w_t.dim() != 2 or x.shape[1] != w_t.shape[0]:
        raise ValueError(f"fused_lora_xw_sb: expected x [M, K] and W [K, N], got {tuple(x.shape)}, {tuple(w_t.shape)}")
    M, K = x.shape
    N = w_t.shape[1]
    R = lora_t.shape[0]
    if x.dtype not in _FLOAT_DTYPES or w_t.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"fused_lora_xw_sb: x, W, bias must share a float dtype, got {x.dtype}, {w_t.dtype}, "
                         f"{None if bias is None else bias.dtype}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"fused_lora_xw_sb: bias must be [{N}], got {tuple(bias.shape)}")
    if not 0 <= rows <= M:
        raise ValueError(f"fused_lora_xw_sb: rows must be in 0..{M}, got {rows}")
    if not 1 <= R <= MAX_RANK or tuple(lora_t.shape) != (R, N) or tuple(s.shape) != (rows, R):
        raise ValueError(f"fused_lora_xw_sb: expected S [{rows}, R] and L [R, {N}] with 1 <= R <= {MAX_RANK}, "
                         f"got {tuple(s.shape)} and {tuple(lora_t.shape)}")
    if s.dtype != torch.float32:
        raise ValueError(f"fused_lora_xw_sb: S must be float32, got {s.dtype}")
    _check_launch(x, w_t, s, lora_t, *([] if bias is None else [bias]))
    out = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out
    if _interpreting():  # fewer, larger programs: the interpreter's cost is per program
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 1
    elif x.dtype == torch.float32:
        bm, bn, bk, warps, stages = 128, 64, 32, 8, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 32, 8, 3
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _jit(_fused_lora_xw_sb_kernel)[grid](
        x, w_t, bias if bias is not None else x, s, lora_t, out, M, N, K, R, rows, float(scale),
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), s.stride(0), s.stride(1),
        lora_t.stride(0), lora_t.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=_rank_block(R),
        GROUP_M=8, UPCAST=_interpreting(), PRECISION=_dot_precision(x.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out


def lora_weight_grad(u, v, scale: float, splits: int | None = None) -> torch.Tensor:
    """``scale * u [rows, P]^T @ v [rows, Q]`` -> float32 ``[P, Q]``; ``splits`` chunks the row sum."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != v.shape[0]:
        raise ValueError(f"lora_weight_grad: expected U [rows, P] and V [rows, Q], got {tuple(u.shape)}, {tuple(v.shape)}")
    _check_launch(u, v)
    (rows, P), Q = u.shape, v.shape[1]
    if rows == 0:
        return torch.zeros((P, Q), dtype=torch.float32, device=u.device)
    block_m = 32 if _interpreting() else 64
    bp = _rank_block(P) if P <= MAX_RANK else 64
    bq = _rank_block(Q) if Q <= MAX_RANK else 64
    tiles = triton.cdiv(P, bp) * triton.cdiv(Q, bq)
    if splits is None:
        # Fill the GPU about twice over; the interpreter gets a few splits so the path is tested.
        target = 4 if _interpreting() else 2 * torch.cuda.get_device_properties(u.device).multi_processor_count
        splits = max(1, target // tiles)
    splits = max(1, min(splits, triton.cdiv(rows, block_m)))
    rows_per_split = triton.cdiv(triton.cdiv(rows, splits), block_m) * block_m
    splits = triton.cdiv(rows, rows_per_split)
    partial = _empty((splits, P, Q), torch.float32, u.device)
    _jit(_lora_weight_grad_kernel)[(triton.cdiv(P, bp), triton.cdiv(Q, bq), splits)](
        u, v, partial, rows, P, Q, rows_per_split,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), partial.stride(0), partial.stride(1),
        partial.stride(2),
        BLOCK_M=block_m, BLOCK_P=bp, BLOCK_Q=bq, UPCAST=_interpreting(),
        PRECISION=_dot_precision(u.dtype), num_warps=4,
    )
    return partial.sum(0).mul_(scale)


def _triton_forward(x, weight, bias, lora_A, lora_B, scale, rows, lora_x):
    xa = x[:rows] if lora_x is None else lora_x
    t = lowrank(xa, lora_A.t())
    y = fused_lora_xw_sb(x, weight.t(), bias, t, lora_B.t(), rows, scale)
    return y, t


def _triton_backward(dy, x, weight, lora_A, lora_B, t, scale, rows, lora_x, need_dx):
    dy_a = dy[:rows]
    xa = x[:rows] if lora_x is None else lora_x
    u = lowrank(dy_a, lora_B)
    d_lora_B = lora_weight_grad(dy_a, t, scale).to(lora_B.dtype)
    d_lora_A = lora_weight_grad(u.to(xa.dtype), xa, scale).to(lora_A.dtype)
    dx = d_lora_x = None
    if lora_x is None:
        if need_dx:
            dx = fused_lora_xw_sb(dy, weight, None, u, lora_A, rows, scale)
    else:
        # Dropout: the low-rank gradient belongs to lora_x (autograd routes it back through the
        # dropout mask), so dx is the frozen term alone.
        if need_dx:
            dx = fused_lora_xw_sb(dy, weight, None, u[:0], lora_A, 0, scale)
        d_lora_x = (scale * (u @ lora_A.float())).to(lora_x.dtype)
    return dx, d_lora_A, d_lora_B, d_lora_x


# ----------------------------------------------------------------------------------------------
# Custom ops: dispatch, fake implementations, autograd, FLOP formulas
# ----------------------------------------------------------------------------------------------


def _use_triton(x: torch.Tensor) -> bool:
    """Unset: CUDA tensors take Triton, others the PyTorch path. ``1``: Triton for every tensor
    (CPU needs TRITON_INTERPRET=1). ``0``: the PyTorch path for every tensor, CUDA included (cuBLAS,
    for shapes where the kernels lose to it: docs/design.md §5, bench/results/)."""
    forced = os.environ.get(FORCE_TRITON_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return x.is_cuda and _triton_installed()


# Schemas spelled out: inference from annotations differs across torch versions (and these are
# postponed, string annotations).
@torch.library.custom_op(
    "cat_engine::lora_linear_fwd", mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
           "int adapter_rows, Tensor? lora_x) -> (Tensor, Tensor)",
)
def _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, adapter_rows, lora_x):
    """``(y [M, N], t [adapter_rows, r] float32)``; see the module docstring."""
    impl = _triton_forward if _use_triton(x) else reference.lora_linear_forward
    return impl(x, weight, bias, lora_A, lora_B, scale, adapter_rows, lora_x)


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, adapter_rows, lora_x):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((adapter_rows, lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op(
    "cat_engine::lora_linear_bwd", mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor t, float scale, "
           "int adapter_rows, Tensor? lora_x, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _lora_linear_bwd(dy, x, weight, lora_A, lora_B, t, scale, adapter_rows, lora_x, need_dx):
    """``(dx or [0], dA, dB, d lora_x or [0])``; see the module docstring."""
    impl = _triton_backward if _use_triton(dy) else reference.lora_linear_backward
    dx, d_a, d_b, d_lx = impl(dy, x, weight, lora_A, lora_B, t, scale, adapter_rows, lora_x, need_dx)
    # Custom ops cannot return None: a 0-element tensor stands for "not computed".
    return (dx if need_dx else dy.new_empty(0), d_a, d_b,
            d_lx if lora_x is not None else dy.new_empty(0))


@_lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, t, scale, adapter_rows, lora_x, need_dx):
    dx = dy.new_empty((dy.shape[0], weight.shape[1]) if need_dx else (0,))
    d_lx = lora_x.new_empty(lora_x.shape) if lora_x is not None else dy.new_empty(0)
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), d_lx


def _setup_context(ctx, inputs, output):
    x, weight, _bias, lora_A, lora_B, scale, rows, lora_x = inputs
    ctx.scale, ctx.rows = scale, rows
    ctx.has_lora_x = lora_x is not None
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], lora_x)


def _backward(ctx, dy, _dt):
    x, weight, lora_A, lora_B, t, lora_x = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros((x.shape[0], weight.shape[0]))
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b, d_lx = torch.ops.cat_engine.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, t, ctx.scale, ctx.rows, lora_x, need_dx)
    return (dx if need_dx else None, None, None, d_a, d_b, None, None,
            d_lx if ctx.has_lora_x else None)


_lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formulas():
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    fwd, bwd = torch.ops.cat_engine.lora_linear_fwd, torch.ops.cat_engine.lora_linear_bwd
    if fwd in flop_registry:  # module re-executed (importlib.reload): registration is global
        return

    @register_flop_formula(fwd)
    def _fwd_flops(x, weight, bias, lora_A, lora_B, scale, rows, lora_x, *args, out_shape=None, **kw) -> int:
        (m, k), n, r = x, weight[0], lora_A[0]
        return 2 * m * k * n + 2 * rows * k * r + 2 * rows * r * n

    @register_flop_formula(bwd)
    def _bwd_flops(dy, x, weight, lora_A, lora_B, t, scale, rows, lora_x, need_dx, *args,
                   out_shape=None, **kw) -> int:
        (m, n), k, r = dy, weight[1], lora_A[0]
        flops = 2 * rows * n * r * 2 + 2 * rows * r * k  # u, dB, dA
        if need_dx:
            flops += 2 * m * n * k
        if need_dx or lora_x is not None:
            flops += 2 * rows * r * k  # scale * u A
        return flops


_register_flop_formulas()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


# (device type, dtype) that autocast_dtype answers inside emulated_autocast, for a device type
# autocast does not know.
_EMULATED_AUTOCAST: contextvars.ContextVar[tuple[str, torch.dtype | None] | None] = contextvars.ContextVar(
    "cat_engine_emulated_autocast", default=None
)


def _autocast_knows(device_type: str) -> bool:
    try:
        torch.is_autocast_enabled(device_type)
    except RuntimeError:  # "unknown device type for autocast" (meta)
        return False
    return True


@contextlib.contextmanager
def emulated_autocast(device_type: str, dtype: torch.dtype | None):
    """Within the block, :func:`autocast_dtype` answers ``dtype`` for ``device_type``.

    For a device type autocast does not know (``meta``), where another layer reproduces autocast's
    casts: the VRAM estimator runs a CUDA step on meta tensors (docs/design.md §6), and the fused op
    must then cast its inputs as ``F.linear`` would under autocast. ``dtype=None`` means no
    autocast there. A context variable, so it holds for this thread (and for autograd's backward
    of meta tensors, which runs on the calling thread) and nests. Raises ``ValueError`` for a
    device type that has autocast of its own (use ``torch.autocast`` there).
    """
    if _autocast_knows(device_type):
        raise ValueError(f"emulated_autocast: {device_type!r} has autocast of its own; use torch.autocast")
    token = _EMULATED_AUTOCAST.set((device_type, dtype))
    try:
        yield
    finally:
        _EMULATED_AUTOCAST.reset(token)


def autocast_dtype(device_type: str):
    """The autocast dtype active for ``device_type``, or None (feature-checked: torch 2.4+ API).

    For a device type autocast does not know, the dtype of the enclosing :func:`emulated_autocast`
    (looked up only there, so ``torch.compile`` of a CPU or CUDA step never traces the lookup).
    """
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # older signatures: only CUDA autocast is queryable
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    except RuntimeError:  # a device type autocast does not know (meta): emulated, or none
        emulated = _EMULATED_AUTOCAST.get()
        if emulated is not None and emulated[0] == device_type:
            return emulated[1]
    return None


def _check_inputs(x, weight, bias, lora_A, lora_B, scale, adapter_rows):
    if x.dim() < 2:
        raise ValueError(f"lora_linear: x must be [batch, ..., K], got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"lora_linear: x and weight must share a dtype in {_FLOAT_DTYPES}, "
                         f"got {x.dtype} and {weight.dtype}")
    if lora_A.dtype not in _FLOAT_DTYPES or lora_B.dtype != lora_A.dtype:
        raise ValueError(f"lora_linear: lora_A and lora_B must share a float dtype, got {lora_A.dtype}, {lora_B.dtype}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"lora_linear: weight must be [N, {K}], got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"lora_linear: bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K or not 1 <= lora_A.shape[0] <= MAX_RANK:
        raise ValueError(f"lora_linear: lora_A must be [r, {K}] with 1 <= r <= {MAX_RANK}, got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_linear: lora_B must be [{N}, {r}], got {tuple(lora_B.shape)}")
    if not 0 <= adapter_rows <= x.shape[0]:
        raise ValueError(f"lora_linear: adapter_rows must be in 0..{x.shape[0]} (batch) or None, got {adapter_rows}")
    devices = {t.device for t in (x, weight, lora_A, lora_B) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"lora_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("lora_linear: weight and bias are frozen (no gradient is computed for them); "
                         "call requires_grad_(False) on them")
    if not math.isfinite(float(scale)):
        raise ValueError(f"lora_linear: scale must be finite, got {scale}")


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float, adapter_rows: int | None = None, *,
                dropout_p: float = 0.0, training: bool = True) -> torch.Tensor:
    """Frozen linear on every row plus a LoRA delta on the leading ``adapter_rows`` rows.

    ``y = x W^T + b`` for all rows; rows ``0 .. adapter_rows-1`` of dim 0 also get
    ``scale * (dropout(x) A^T) B^T``. Gradients flow to ``x`` (when it requires grad), ``lora_A``
    and ``lora_B``; rows past ``adapter_rows`` contribute nothing to ``lora_A``/``lora_B``.

    Args:
        x: ``[batch, ..., K]``; float32, float16 or bfloat16; any strides (diffusers layouts:
            ``[B, tokens, C]``, ``[B, H*W, C]``).
        weight: ``[N, K]``, frozen, same dtype as ``x``.
        bias: ``[N]`` same dtype as ``x``, frozen, or ``None``.
        lora_A: ``[r, K]`` (peft's ``lora_A.weight``), ``1 <= r <= 128``; float32, float16 or
            bfloat16, may differ from ``x``'s dtype (float32 adapters on a half-precision model).
        lora_B: ``[N, r]`` (peft's ``lora_B.weight``), same dtype as ``lora_A``.
        scale: Python float, peft's ``lora_alpha / r``.
        adapter_rows: ``0 .. batch``; ``None`` means every row (plain LoRA), ``0`` the base layer.
        dropout_p: dropout probability on the LoRA branch's input (peft's ``lora_dropout``),
            applied only when ``training``.

    Returns:
        ``[batch, ..., N]`` in ``x``'s dtype. Products accumulate in float32. Under autocast,
        ``x``, ``weight``, ``bias`` are first cast to the autocast dtype, as ``F.linear`` would be.
    """
    amp = autocast_dtype(x.device.type)
    if amp is not None:
        x, weight = x.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    rows_b = x.shape[0] if adapter_rows is None else int(adapter_rows)
    _check_inputs(x, weight, bias, lora_A, lora_B, scale, rows_b)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = rows_b * (x2.shape[0] // x.shape[0]) if x.shape[0] else 0
    lora_x = None
    if dropout_p > 0.0 and training and rows:
        lora_x = torch.nn.functional.dropout(x2[:rows], p=dropout_p, training=True)
    y, _ = torch.ops.cat_engine.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, float(scale), rows, lora_x)
    return y.reshape(*lead, weight.shape[0])
