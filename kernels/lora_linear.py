"""LoRA linear for split batches: ``y = x Wᵀ + b`` on every row, plus the low-rank delta
``scale * (x Aᵀ) Bᵀ`` on the first ``adapter_rows`` rows only (docs/design.md §4, §5).

:func:`lora_linear` checks its inputs, applies autocast's casts, and runs one of two paths:

- ``torch`` (``kernels/lora_torch.py``): cuBLAS for every product, the delta accumulated in place
  into the adapter rows of the output. The default, and the only path on CPU and meta tensors.
- ``triton`` (``kernels/lora_triton.py``): cuBLAS for the frozen product, Triton kernels for the
  low-rank parts; a custom op with a fake implementation, so ``torch.compile`` traces it too.

Which one runs on a GPU is measured once per shape and remembered (``kernels/dispatch.py``);
``CAT_ENGINE_LORA_PATH=torch|triton`` forces one (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``: the tests run the kernels that way). While ``torch.compile`` traces, the
torch path runs (inductor then generates its own kernels) unless ``triton`` is forced.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F

from cat_engine.kernels import dispatch
from cat_engine.kernels.lora_torch import TorchLoraLinear
from cat_engine.kernels.lora_triton import MAX_RANK, triton_installed, triton_lora_linear

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
        raise ValueError(
            f"lora_linear: x and weight must share a dtype in {_FLOAT_DTYPES}, "
            f"got {x.dtype} and {weight.dtype}"
        )
    if lora_A.dtype not in _FLOAT_DTYPES or lora_B.dtype != lora_A.dtype:
        raise ValueError(
            f"lora_linear: lora_A and lora_B must share a float dtype, got {lora_A.dtype}, {lora_B.dtype}"
        )
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"lora_linear: weight must be [N, {K}], got {tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"lora_linear: bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K or not 1 <= lora_A.shape[0] <= MAX_RANK:
        raise ValueError(
            f"lora_linear: lora_A must be [r, {K}] with 1 <= r <= {MAX_RANK}, got {tuple(lora_A.shape)}"
        )
    if lora_B.shape != (N, lora_A.shape[0]):
        raise ValueError(f"lora_linear: lora_B must be [{N}, {lora_A.shape[0]}], got {tuple(lora_B.shape)}")
    if not 0 <= adapter_rows <= x.shape[0]:
        raise ValueError(
            f"lora_linear: adapter_rows must be in 0..{x.shape[0]} (batch) or None, got {adapter_rows}"
        )
    device = x.device
    if (
        weight.device != device
        or lora_A.device != device
        or lora_B.device != device
        or (bias is not None and bias.device != device)
    ):
        devices = {t.device for t in (x, weight, lora_A, lora_B) + (() if bias is None else (bias,))}
        raise ValueError(f"lora_linear: all tensors must be on one device, got {sorted(map(str, devices))}")
    if (weight.requires_grad or (bias is not None and bias.requires_grad)) and torch.is_grad_enabled():
        raise ValueError(
            "lora_linear: weight and bias are frozen (no gradient is computed for them); "
            "call requires_grad_(False) on them"
        )
    if not math.isfinite(scale):
        raise ValueError(f"lora_linear: scale must be finite, got {scale}")


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    adapter_rows: int | None = None,
    *,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Frozen linear on every row plus a LoRA delta on the leading ``adapter_rows`` rows.

    ``y = x W^T + b`` for all rows; rows ``0 .. adapter_rows-1`` of dim 0 also get
    ``scale * (dropout(x) A^T) B^T``. Gradients flow to ``x`` (when it requires grad), ``lora_A``
    and ``lora_B``; rows past ``adapter_rows`` contribute nothing to ``lora_A``/``lora_B``, and with
    ``adapter_rows=0`` the call is the frozen linear alone (no gradient reaches them).

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
        ``[batch, ..., N]`` in ``x``'s dtype. Under autocast, ``x``, ``weight``, ``bias`` are first
        cast to the autocast dtype, as ``F.linear`` would be. The products run in that compute
        dtype (the LoRA weights are cast to it, as autocast casts them for peft's layers) and
        accumulate in float32 inside cuBLAS/Triton; the LoRA gradients come back in their own dtype.
    """
    device_type = x.device.type
    amp = autocast_dtype(device_type)
    if amp is not None:
        if x.dtype != amp:
            x = x.to(amp)
        if weight.dtype != amp:
            weight = weight.to(amp)
            bias = bias.to(amp) if bias is not None else None
    batch = x.shape[0]
    rows_b = batch if adapter_rows is None else int(adapter_rows)
    scale = float(scale)
    _check_inputs(x, weight, bias, lora_A, lora_B, scale, rows_b)
    numel = x.numel()
    if rows_b == 0 or numel == 0:
        return F.linear(x, weight, bias)
    rows = rows_b * (numel // (batch * x.shape[-1]))
    lora_x = None
    if dropout_p > 0.0 and training:
        lora_x = F.dropout(x[:rows_b], p=dropout_p, training=True).reshape(rows, x.shape[-1])
    forced = dispatch.forced_path()
    if forced == "triton" or (
        forced is None
        and device_type == "cuda"
        and _measured_path(x, weight, bias, lora_A, rows, lora_x) == "triton"
    ):
        return triton_lora_linear(x, weight, bias, lora_A, lora_B, scale, rows, lora_x)
    return TorchLoraLinear.apply(x, weight, bias, lora_A, lora_B, scale, rows, lora_x)


def _measured_path(x, weight, bias, lora_A, rows, lora_x) -> str:
    """The measured path for a CUDA call under ``auto`` (see the module docstring)."""
    if not triton_installed() or dispatch.compiling():
        return "torch"
    grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad)
    M, K = x.numel() // x.shape[-1], x.shape[-1]
    N, r = weight.shape[0], lora_A.shape[0]
    key = (
        x.device.index,
        x.dtype,
        lora_A.dtype,
        M,
        K,
        N,
        r,
        rows,
        bias is not None,
        grad,
        lora_x is not None,
    )
    return dispatch.DISPATCHER.choose(
        key,
        describe=lambda: _describe(key, x.device),
        measure=lambda: _measure(x, weight, bias, lora_A, rows, lora_x is not None, grad),
    )


def _describe(key: tuple, device: torch.device) -> str:
    """The key of a shape in the cache file: device, library versions, shapes, dtypes, modes."""
    _index, dtype, lora_dtype, M, K, N, r, rows, has_bias, grad, dropout = key
    from cat_engine.kernels import lora_triton

    lora_triton._load_triton()
    return (
        f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|triton {lora_triton.triton.__version__}|"
        f"{str(dtype).removeprefix('torch.')}|lora {str(lora_dtype).removeprefix('torch.')}|"
        f"M={M} K={K} N={N} r={r} rows={rows}|bias={int(has_bias)} grad={int(grad)} dropout={int(dropout)}"
    )


def _measure(x, weight, bias, lora_A, rows, dropout, grad) -> dict[str, float]:
    """Seconds of each path on stand-in tensors shaped like this call's: forward, and backward
    when the call needs gradients. Constant values: no random number is drawn."""
    M, K, N, r = x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], lora_A.shape[0]
    dev, dt, lora_dt = x.device, x.dtype, lora_A.dtype

    def full(*shape, dtype=dt, grad_=False):
        return torch.full(shape, 0.01, device=dev, dtype=dtype).requires_grad_(grad_)

    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        xs, ws = full(M, K, grad_=grad and x.requires_grad), full(N, K)
        bs = full(N) if bias is not None else None
        a, b = full(r, K, dtype=lora_dt, grad_=grad), full(N, r, dtype=lora_dt, grad_=grad)
        lx = full(rows, K, grad_=grad) if dropout else None
        dy = full(M, N)

        def run(path_fn):
            def once():
                y = path_fn(xs, ws, bs, a, b, 1.0, rows, lx)
                if grad:
                    y.backward(dy)
                    for t in (xs, a, b, lx):
                        if t is not None:
                            t.grad = None

            return once

        return dispatch.time_paths({"torch": run(TorchLoraLinear.apply), "triton": run(triton_lora_linear)})
