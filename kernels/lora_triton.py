"""The Triton LoRA linear: the second path of :func:`cat_engine.kernels.lora_linear`, taken where
it measures faster than the cuBLAS-first path (docs/design.md §5; ``kernels/dispatch.py``).

Built the way the fastest public LoRA kernels are: the frozen ``x Wᵀ + b`` (and ``dy W``) stay
with cuBLAS; Triton runs only the low-rank parts over the adapter rows. For ``M`` flat rows, the
first ``Ma`` adapter rows, rank ``r``:

Forward:
    y    = x Wᵀ + b                               cuBLAS (F.linear)
    t    = x_a Aᵀ                      [Ma, r]    fp32   _shrink_kernel
    y_a += scale · t Bᵀ                           in place   _expand_kernel (ADD)
Backward:
    u    = dy_a B                      [Ma, r]    fp32   _shrink_kernel
    dx   = dy W                                   cuBLAS (mm)
    dx_a += scale · u A                           in place   _expand_kernel (ADD)
           (with dropout: d lora_x = scale · u A, _expand_kernel writing)
    dB, dA = scale · dy_aᵀ t, scale · uᵀ x_a      one launch: _weight_grads_kernel

Layout of this file: kernels (maths in their docstrings), launchers (shape and dtype checks,
autotuning), the custom ops with their fake implementations, autograd and FLOP formulas, and
:func:`triton_lora_linear`.

On a GPU every kernel is wrapped in ``triton.autotune`` over a few block configurations, keyed
on its sizes; under ``TRITON_INTERPRET=1`` (CPU tests) or ``CAT_ENGINE_TRITON_AUTOTUNE=0`` one
configuration runs. Triton decorates
its own jitted helpers once, at import, in the mode the environment then says, and torch, peft and
diffusers import triton early; so the kernels here use only core builtins (``tl.full``, plain
integer division) and are decorated lazily, per setting, at launch.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os

import torch
import torch.nn.functional as F

# Imported on first launch (_load_triton), not here: importing triton fixes its interpreter mode
# for the whole process, and the package must import where triton is absent (non-Linux).
triton = None
tl = None

MAX_RANK = 128


# ----------------------------------------------------------------------------------------------
# Kernels. Plain functions, jitted on first launch by _kernel() (see module docstring); their
# ``tl.constexpr`` annotations stay strings (postponed annotations), which triton reads as such.
# ----------------------------------------------------------------------------------------------


def _shrink_kernel(
    X,
    L,
    OUT,
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_lk,
    stride_lr,
    stride_om,
    stride_or,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """OUT[m, r] = sum_k X[m, k] L[k, r]  for m < M, r < R (R <= BLOCK_R); OUT float32.

    One program per BLOCK_M rows; the whole (padded) rank fits in one tile. Dot operands are
    X's dtype (L is cast to it), accumulation is float32. Forward: X=x_a, L=Aᵀ. Backward: X=dy_a, L=B.
    """
    pid = tl.program_id(0)
    rm = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(
            X + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
            mask=(rm[:, None] < M) & (kk[None, :] < K),
            other=0.0,
        )
        lt = tl.load(
            L + kk[:, None] * stride_lk + rr[None, :] * stride_lr,
            mask=(kk[:, None] < K) & (rr[None, :] < R),
            other=0.0,
        )
        if UPCAST:  # interpreter: tl.dot on bf16 is wrong there (docs/design.md §5)
            acc += tl.dot(x.to(tl.float32), lt.to(tl.float32))
        else:
            acc = tl.dot(x, lt.to(x.dtype), acc, input_precision=PRECISION)
    tl.store(
        OUT + rm[:, None] * stride_om + rr[None, :] * stride_or,
        acc,
        mask=(rm[:, None] < M) & (rr[None, :] < R),
    )


def _expand_kernel(
    S,
    L,
    OUT,
    M,
    N,
    R,
    scale,
    stride_sm,
    stride_sr,
    stride_lr,
    stride_ln,
    stride_om,
    stride_on,
    ADD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """OUT[m, n] = [ADD] OUT[m, n] + scale * sum_r S[m, r] L[r, n]  for m < M, n < N.

    S is float32 ``[M, R]``; the dot runs in OUT's dtype, accumulating in float32, and the sum
    with OUT's old value is rounded once. Forward: S=t, L=Bᵀ, OUT=y_a. Backward: S=u, L=A, OUT=dx_a.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    s = tl.load(
        S + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
        mask=(rm[:, None] < M) & (rr[None, :] < R),
        other=0.0,
    )
    lo = tl.load(
        L + rr[:, None] * stride_lr + rn[None, :] * stride_ln,
        mask=(rr[:, None] < R) & (rn[None, :] < N),
        other=0.0,
    )
    if UPCAST:
        acc = tl.dot(s.to(tl.float32), lo.to(tl.float32)) * scale
    else:
        dt = OUT.dtype.element_ty
        acc = tl.dot(s.to(dt), lo.to(dt), input_precision=PRECISION) * scale
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    out = OUT + rm[:, None] * stride_om + rn[None, :] * stride_on
    if ADD:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)


def _weight_grads_kernel(
    U1,
    V1,
    OUT1,
    U2,
    V2,
    OUT2,
    ROWS,
    P1,
    P2,
    R,
    SPLITS,
    scale,
    stride_u1m,
    stride_u1p,
    stride_v1m,
    stride_v1r,
    stride_o1s,
    stride_o1p,
    stride_o1r,
    stride_u2m,
    stride_u2p,
    stride_v2m,
    stride_v2r,
    stride_o2s,
    stride_o2p,
    stride_o2r,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Both LoRA weight gradients in one launch, as float32 partial sums over row splits:

        OUT1[s, p, q] = scale * sum_{m in split s} U1[m, p] V1[m, q]   p < P1   (dB: U1=dy_a, V1=t)
        OUT2[s, p, q] = scale * sum_{m in split s} U2[m, p] V2[m, q]   p < P2   (dAᵀ: U2=x_a, V2=u)

    for q < R (one tile). Grid: (tiles of P1 + tiles of P2, SPLITS). The reduction runs over the
    long row dimension, so it is cut into SPLITS chunks of a multiple of BLOCK_M rows to fill the
    GPU; the launcher sums the partials. A split past the last row writes zeros. Dot operands are
    U's dtype (V is cast to it), accumulation is float32. The two halves are written out in full
    rather than selecting pointers, so no value of a pointer type crosses a branch.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    tiles1 = (P1 + BLOCK_P - 1) // BLOCK_P
    per_split = ((ROWS + SPLITS - 1) // SPLITS + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = pid_s * per_split
    end = min(start + per_split, ROWS)
    rb = tl.arange(0, BLOCK_M)
    rq = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_P, BLOCK_R), 0.0, tl.float32)
    if pid < tiles1:
        rp = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        for m0 in range(start, end, BLOCK_M):
            rm = (m0 + rb).to(tl.int64)
            u = tl.load(
                U1 + rm[:, None] * stride_u1m + rp[None, :] * stride_u1p,
                mask=(rm[:, None] < end) & (rp[None, :] < P1),
                other=0.0,
            )
            v = tl.load(
                V1 + rm[:, None] * stride_v1m + rq[None, :] * stride_v1r,
                mask=(rm[:, None] < end) & (rq[None, :] < R),
                other=0.0,
            )
            if UPCAST:
                acc += tl.dot(tl.trans(u.to(tl.float32)), v.to(tl.float32))
            else:
                acc = tl.dot(tl.trans(u), v.to(u.dtype), acc, input_precision=PRECISION)
        tl.store(
            OUT1 + pid_s * stride_o1s + rp[:, None] * stride_o1p + rq[None, :] * stride_o1r,
            acc * scale,
            mask=(rp[:, None] < P1) & (rq[None, :] < R),
        )
    else:
        rp = (pid - tiles1) * BLOCK_P + tl.arange(0, BLOCK_P)
        for m0 in range(start, end, BLOCK_M):
            rm = (m0 + rb).to(tl.int64)
            u = tl.load(
                U2 + rm[:, None] * stride_u2m + rp[None, :] * stride_u2p,
                mask=(rm[:, None] < end) & (rp[None, :] < P2),
                other=0.0,
            )
            v = tl.load(
                V2 + rm[:, None] * stride_v2m + rq[None, :] * stride_v2r,
                mask=(rm[:, None] < end) & (rq[None, :] < R),
                other=0.0,
            )
            if UPCAST:
                acc += tl.dot(tl.trans(u.to(tl.float32)), v.to(tl.float32))
            else:
                acc = tl.dot(tl.trans(u), v.to(u.dtype), acc, input_precision=PRECISION)
        tl.store(
            OUT2 + pid_s * stride_o2s + rp[:, None] * stride_o2p + rq[None, :] * stride_o2r,
            acc * scale,
            mask=(rp[:, None] < P2) & (rq[None, :] < R),
        )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Block configurations tried by triton.autotune on a GPU, and the one the interpreter (or
# CAT_ENGINE_TRITON_AUTOTUNE=0) runs: (meta-parameters, num_warps, num_stages).
_CONFIGS = {
    "shrink": (
        [({"BLOCK_M": 32, "BLOCK_K": 64}, 4, 3), ({"BLOCK_M": 64, "BLOCK_K": 64}, 4, 3),
         ({"BLOCK_M": 128, "BLOCK_K": 32}, 4, 3), ({"BLOCK_M": 64, "BLOCK_K": 128}, 4, 2)],
        {"BLOCK_M": 32, "BLOCK_K": 32},
    ),
    "expand": (
        [({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2), ({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 2),
         ({"BLOCK_M": 64, "BLOCK_N": 128}, 4, 2), ({"BLOCK_M": 128, "BLOCK_N": 128}, 8, 2)],
        {"BLOCK_M": 32, "BLOCK_N": 64},
    ),
    "weight_grads": (
        [({"BLOCK_M": 32, "BLOCK_P": 64}, 4, 3), ({"BLOCK_M": 64, "BLOCK_P": 64}, 4, 3),
         ({"BLOCK_M": 64, "BLOCK_P": 128}, 4, 2), ({"BLOCK_M": 32, "BLOCK_P": 128}, 4, 3)],
        {"BLOCK_M": 32, "BLOCK_P": 32},
    ),
}  # fmt: skip
AUTOTUNE_ENV = "CAT_ENGINE_TRITON_AUTOTUNE"
# Milliseconds of warm-up and of timed runs per configuration while autotuning (triton's defaults,
# 25 and 100, make a first call of a new shape cost seconds).
_AUTOTUNE_MS = {"warmup": 5, "rep": 20}
_KEYS = {"shrink": ["M", "K", "R"], "expand": ["M", "N", "R"], "weight_grads": ["ROWS", "P1", "P2", "R"]}
_FUNCTIONS = {"shrink": _shrink_kernel, "expand": _expand_kernel, "weight_grads": _weight_grads_kernel}
# In-place kernels: autotuning runs them several times, so their output is restored after each.
_RESTORE = {"expand": ["OUT"]}
_KERNELS: dict = {}


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _load_triton():
    global triton, tl
    if triton is None:
        if not triton_installed():
            raise RuntimeError(
                "lora_linear: Triton is not installed; use the torch path (CAT_ENGINE_LORA_PATH=torch)"
            )
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernel(name: str):
    """``(launchable kernel, fixed meta-parameters)`` for the current settings.

    On a GPU: the autotuned kernel (no fixed meta-parameters). Under the interpreter, or with
    ``CAT_ENGINE_TRITON_AUTOTUNE=0`` (the GPU kernel tests: one compile per kernel, not one per
    configuration): the plain jitted kernel and the one configuration it runs. Decorated once per
    setting.
    """
    single_config = interpreting() or os.environ.get(AUTOTUNE_ENV) == "0"
    key = (name, interpreting(), single_config)
    if key not in _KERNELS:
        jitted = triton.jit(_FUNCTIONS[name])
        configs, single = _CONFIGS[name]
        if single_config:
            _KERNELS[key] = (jitted, dict(single))
        else:
            accepted = inspect.signature(triton.autotune).parameters
            options = {k: v for k, v in _AUTOTUNE_MS.items() if k in accepted}
            if name in _RESTORE and "restore_value" in accepted:
                options["restore_value"] = _RESTORE[name]
            elif name in _RESTORE:  # an old triton: no way to undo a trial run, so no trials
                configs = configs[:1]
            tuned = triton.autotune(
                [triton.Config(meta, num_warps=w, num_stages=s) for meta, w, s in configs],
                key=_KEYS[name],
                **options,
            )(jitted)
            _KERNELS[key] = (tuned, {})
    return _KERNELS[key]


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
    if x.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"lora_linear: Triton kernels got {x.device.type} tensors without TRITON_INTERPRET=1; "
            "set it before triton is imported, or use CAT_ENGINE_LORA_PATH=torch"
        )
    _load_triton()
    for t in others:
        if t.device != x.device:
            raise ValueError(f"lora_linear: tensors on different devices ({x.device} and {t.device})")


def shrink(x: torch.Tensor, lora_t: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ lora_t [K, R]`` -> float32 ``[M, R]``, ``R <= 128``; any strides (``A.t()``)."""
    if x.dim() != 2 or lora_t.dim() != 2 or x.shape[1] != lora_t.shape[0]:
        raise ValueError(
            f"shrink: expected x [M, K] and L [K, R], got {tuple(x.shape)} and {tuple(lora_t.shape)}"
        )
    if not 1 <= lora_t.shape[1] <= MAX_RANK:
        raise ValueError(f"shrink: rank must be in 1..{MAX_RANK}, got {lora_t.shape[1]}")
    _check_launch(x, lora_t)
    (M, K), R = x.shape, lora_t.shape[1]
    out = _empty((M, R), torch.float32, x.device)
    if M == 0:
        return out
    kernel, meta = _kernel("shrink")
    kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]),)](
        x,
        lora_t,
        out,
        M,
        K,
        R,
        x.stride(0),
        x.stride(1),
        lora_t.stride(0),
        lora_t.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_R=_rank_block(R),
        UPCAST=interpreting(),
        PRECISION=_dot_precision(x.dtype),
        **meta,
    )
    return out


def expand(
    s: torch.Tensor, lora_t: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``out += scale * s [M, R] @ lora_t [R, N]`` in place, or a new ``[M, N]`` (``out=None``, in
    ``lora_t``'s dtype). ``s`` float32; ``out`` may be a row-range view (``y[:rows]``)."""
    if s.dim() != 2 or lora_t.dim() != 2 or s.shape[1] != lora_t.shape[0]:
        raise ValueError(
            f"expand: expected S [M, R] and L [R, N], got {tuple(s.shape)} and {tuple(lora_t.shape)}"
        )
    if s.dtype != torch.float32:
        raise ValueError(f"expand: S must be float32, got {s.dtype}")
    (M, R), N = s.shape, lora_t.shape[1]
    if not 1 <= R <= MAX_RANK:
        raise ValueError(f"expand: rank must be in 1..{MAX_RANK}, got {R}")
    add = out is not None
    if add and tuple(out.shape) != (M, N):
        raise ValueError(f"expand: out must be [{M}, {N}], got {tuple(out.shape)}")
    _check_launch(s, lora_t, *((out,) if add else ()))
    if not add:
        out = _empty((M, N), lora_t.dtype, s.device)
    if M == 0 or N == 0:
        return out
    kernel, meta = _kernel("expand")
    kernel[lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))](
        s,
        lora_t,
        out,
        M,
        N,
        R,
        float(scale),
        s.stride(0),
        s.stride(1),
        lora_t.stride(0),
        lora_t.stride(1),
        out.stride(0),
        out.stride(1),
        ADD=add,
        BLOCK_R=_rank_block(R),
        UPCAST=interpreting(),
        PRECISION=_dot_precision(out.dtype),
        **meta,
    )
    return out


def weight_grads(dy_a, t, xa, u, scale: float, splits: int | None = None):
    """``(dB, dA)`` = ``(scale * dy_aᵀ t, scale * uᵀ x_a)``, float32, from one kernel launch.

    ``dy_a [rows, N]``, ``x_a [rows, K]`` (one float dtype), ``t``, ``u`` float32 ``[rows, r]``.
    ``splits`` chunks the row sum (default: enough programs to fill the GPU about twice).
    """
    rows, N = dy_a.shape
    K, R = xa.shape[1], t.shape[1]
    if tuple(t.shape) != (rows, R) or tuple(u.shape) != (rows, R) or xa.shape[0] != rows:
        raise ValueError(
            f"weight_grads: expected dy_a [rows, N], t [rows, r], x_a [rows, K], u [rows, r]; got "
            f"{tuple(dy_a.shape)}, {tuple(t.shape)}, {tuple(xa.shape)}, {tuple(u.shape)}"
        )
    if dy_a.dtype != xa.dtype or t.dtype != torch.float32 or u.dtype != torch.float32:
        raise ValueError("weight_grads: dy_a and x_a must share a dtype, t and u be float32")
    _check_launch(dy_a, t, xa, u)
    if rows == 0:
        return (
            torch.zeros((N, R), dtype=torch.float32, device=t.device),
            torch.zeros((R, K), dtype=torch.float32, device=t.device),
        )
    if splits is None:
        # A few splits under the interpreter, so that the path is tested; a full GPU otherwise.
        target = 4 if interpreting() else 2 * torch.cuda.get_device_properties(t.device).multi_processor_count
        splits = max(1, target // max(1, triton.cdiv(N + K, 64)))
    splits = max(1, min(splits, triton.cdiv(rows, 16)))
    # Two buffers, not views of one: the custom op's outputs may not alias each other.
    part_b = _empty((splits, N, R), torch.float32, t.device)
    part_a = _empty((splits, R, K), torch.float32, t.device)  # written as dAᵀ tiles: p runs over K
    kernel, meta = _kernel("weight_grads")
    kernel[lambda m: (triton.cdiv(N, m["BLOCK_P"]) + triton.cdiv(K, m["BLOCK_P"]), splits)](
        dy_a,
        t,
        part_b,
        xa,
        u,
        part_a,
        rows,
        N,
        K,
        R,
        splits,
        float(scale),
        dy_a.stride(0),
        dy_a.stride(1),
        t.stride(0),
        t.stride(1),
        part_b.stride(0),
        part_b.stride(1),
        part_b.stride(2),
        xa.stride(0),
        xa.stride(1),
        u.stride(0),
        u.stride(1),
        part_a.stride(0),
        part_a.stride(2),
        part_a.stride(1),
        BLOCK_R=_rank_block(R),
        UPCAST=interpreting(),
        PRECISION=_dot_precision(xa.dtype),
        **meta,
    )
    if splits == 1:
        return part_b[0], part_a[0]
    return part_b.sum(0), part_a.sum(0)


def _forward(x, weight, bias, lora_A, lora_B, scale, rows, lora_x):
    y = F.linear(x, weight, bias)
    xa = x[:rows] if lora_x is None else lora_x
    t = shrink(xa, lora_A.t())
    if rows:
        expand(t, lora_B.t(), scale, out=y[:rows])
    return y, t


def _backward(dy, x, weight, lora_A, lora_B, t, scale, rows, lora_x, need_dx):
    dy_a = dy[:rows]
    xa = x[:rows] if lora_x is None else lora_x
    u = shrink(dy_a, lora_B)
    d_b, d_a = weight_grads(dy_a, t, xa, u, scale)
    dx = d_lora_x = None
    if need_dx:
        dx = dy.mm(weight)
        if lora_x is None and rows:
            expand(u, lora_A, scale, out=dx[:rows])
    if lora_x is not None:
        # Dropout: the low-rank gradient belongs to lora_x (autograd routes it back through the
        # dropout mask), so dx is the frozen term alone.
        d_lora_x = expand(u, lora_A.to(lora_x.dtype), scale)
    return dx, d_a.to(lora_A.dtype), d_b.to(lora_B.dtype), d_lora_x


# ----------------------------------------------------------------------------------------------
# Custom ops: fake implementations, autograd, FLOP formulas
# ----------------------------------------------------------------------------------------------


# Schemas spelled out: inference from annotations differs across torch versions (and these are
# postponed, string annotations).
@torch.library.custom_op(
    "cat_engine::lora_linear_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scale, "
    "int adapter_rows, Tensor? lora_x) -> (Tensor, Tensor)",
)
def _lora_linear_fwd(x, weight, bias, lora_A, lora_B, scale, adapter_rows, lora_x):
    """``(y [M, N], t [adapter_rows, r] float32)``; see the module docstring."""
    return _forward(x, weight, bias, lora_A, lora_B, scale, adapter_rows, lora_x)


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scale, adapter_rows, lora_x):
    return (
        x.new_empty((x.shape[0], weight.shape[0])),
        x.new_empty((adapter_rows, lora_A.shape[0]), dtype=torch.float32),
    )


@torch.library.custom_op(
    "cat_engine::lora_linear_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor t, float scale, "
    "int adapter_rows, Tensor? lora_x, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _lora_linear_bwd(dy, x, weight, lora_A, lora_B, t, scale, adapter_rows, lora_x, need_dx):
    """``(dx or [0], dA, dB, d lora_x or [0])``; see the module docstring."""
    dx, d_a, d_b, d_lx = _backward(dy, x, weight, lora_A, lora_B, t, scale, adapter_rows, lora_x, need_dx)
    # Custom ops cannot return None: a 0-element tensor stands for "not computed".
    return (dx if need_dx else dy.new_empty(0), d_a, d_b, d_lx if lora_x is not None else dy.new_empty(0))


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


def _autograd_backward(ctx, dy, _dt):
    x, weight, lora_A, lora_B, t, lora_x = ctx.saved_tensors
    if dy is None:
        dy = x.new_zeros((x.shape[0], weight.shape[0]))
    need_dx = ctx.needs_input_grad[0]
    dx, d_a, d_b, d_lx = torch.ops.cat_engine.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, t, ctx.scale, ctx.rows, lora_x, need_dx
    )
    return (dx if need_dx else None, None, None, d_a, d_b, None, None, d_lx if ctx.has_lora_x else None)


_lora_linear_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


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
    def _bwd_flops(
        dy, x, weight, lora_A, lora_B, t, scale, rows, lora_x, need_dx, *args, out_shape=None, **kw
    ) -> int:
        (m, n), k, r = dy, weight[1], lora_A[0]
        flops = 2 * rows * n * r * 2 + 2 * rows * r * k  # u, dB, dA
        if need_dx:
            flops += 2 * m * n * k
        if need_dx or lora_x is not None:
            flops += 2 * rows * r * k  # scale * u A
        return flops


_register_flop_formulas()


def triton_lora_linear(x, weight, bias, lora_A, lora_B, scale: float, rows: int, lora_x=None):
    """The Triton path on ``x [batch, ..., K]`` (compute dtype), ``rows`` flat adapter rows >= 1,
    ``lora_x`` ``[rows, K]`` or None; returns ``[batch, ..., N]``."""
    lead = x.shape[:-1]
    y, _ = torch.ops.cat_engine.lora_linear_fwd(
        x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, float(scale), rows, lora_x
    )
    return y.reshape(*lead, weight.shape[0])
