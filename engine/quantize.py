"""Frozen base weights in 8 bits (docs/design.md §6, §9); the LoRA weights and the CAT maths stay as they were.

    quantize_frozen(model, "int8")   # every frozen nn.Linear: int8 values and a float32 scale per row

Modes (``MemoryPlan.frozen_quant``, ``--frozen-quant``): ``int8`` (weight-only, symmetric, one scale
per output row: torchao's ``Int8Tensor``) and ``fp8`` (float8 e4m3 values, one scale per row: torchao's
``Float8Tensor``; only on GPUs with fp8 hardware, :func:`fp8_problem`). torchao is an optional
dependency (``pip install 'cat-engine[quant]'``); without it the modes are refused in one line.

What changes on the model: each frozen ``nn.Linear`` outside LoRA keeps its module object, its
parameter names and its bias, but its weight becomes the quantised tensor and its class
:class:`QuantizedLinear`. The LoRA layers' ``lora_A``/``lora_B`` are never quantised, and a fused
LoRA layer on a quantised base (``engine/fused_lora.py``) runs :func:`lora_on_quantized_base`: the
frozen product through the quantised Linear on every row, the LoRA delta on the adapter rows as before.

Why our own autograd Function (:class:`_FrozenQuantizedLinear`) rather than torchao's linear:
torchao's weight-only linear builds the product from a dequantised copy of the weight, and autograd
keeps that copy for backward: a full-precision copy of every weight the step touches, the memory the
quantisation was meant to save. Here forward and backward each dequantise the weight for their one
product (``y = x W^T``, ``dx = dy W``) and the graph keeps only a reference to the quantised weight.
Gradients reach the input only: the frozen weight gets none.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from cat_engine.engine.errors import CatEngineError
from cat_engine.kernels.lora_linear import autocast_dtype

QUANT_MODES = ("none", "int8", "fp8")
INSTALL_HINT = "pip install 'cat-engine[quant]' (torchao)"
FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with fp8 tensor cores


class QuantizationError(CatEngineError):
    """A quantisation mode that cannot run here (torchao missing, no fp8 hardware); the message says why."""


# --------------------------------------------------------------------------------------------------
# torchao and the hardware
# --------------------------------------------------------------------------------------------------


# Loggers that speak when torchao is imported (peft imports it whenever it is installed): torchao
# warns per compiled extension it cannot load (CUDA kernels on a CPU machine), torch about torchao's
# enum registrations, diffusers about torchao tensor types it cannot find. Noise, not problems.
IMPORT_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_torchao_import_logs() -> None:
    """Silence :data:`IMPORT_NOISE` below errors (the CLI calls this before importing anything)."""
    for name in IMPORT_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet_import():
    loggers = [logging.getLogger(n) for n in IMPORT_NOISE]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao():
    """``(Int8Tensor, Float8Tensor, PerRow)`` from torchao; :class:`QuantizationError` when it is absent."""
    try:
        with _quiet_import():
            from torchao.quantization import Float8Tensor, Int8Tensor
            from torchao.quantization.granularity import PerRow
    except Exception as exc:  # noqa: BLE001 - ImportError, or a build that fails on this torch
        raise QuantizationError(
            f"--frozen-quant needs torchao ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"{INSTALL_HINT}"
        ) from None
    return Int8Tensor, Float8Tensor, PerRow


def torchao_problem() -> str | None:
    """``None`` when torchao imports, else why not (one line)."""
    try:
        _torchao()
    except QuantizationError as exc:
        return str(exc)
    return None


def fp8_problem(device) -> str | None:
    """``None`` when ``device`` is a GPU with fp8 hardware (compute capability 8.9+), else why not."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn"):
        return "--frozen-quant fp8: this torch has no float8 dtypes; use --frozen-quant int8"
    if device.type != "cuda":
        return f"--frozen-quant fp8 needs a CUDA GPU with fp8 (compute capability 8.9+), not {device.type}; use int8"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        return (
            f"--frozen-quant fp8: this GPU (compute capability {capability[0]}.{capability[1]}) has no fp8; "
            "it needs 8.9+ (Ada, Hopper); use --frozen-quant int8"
        )
    return None


def check_mode(mode: str, device) -> None:
    """Raise :class:`QuantizationError` when ``mode`` cannot run on ``device``."""
    if mode not in QUANT_MODES:
        raise QuantizationError(f"--frozen-quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    if mode == "none":
        return
    problem = torchao_problem() or (fp8_problem(device) if mode == "fp8" else None)
    if problem:
        raise QuantizationError(problem)


# --------------------------------------------------------------------------------------------------
# Quantised tensors: their plain parts, their bytes, their values
# --------------------------------------------------------------------------------------------------


def is_quantized(t) -> bool:
    """Whether ``t`` is a quantised weight of :func:`quantize_frozen` (a torchao tensor with ``qdata`` and ``scale``)."""
    return isinstance(t, torch.Tensor) and type(t) is not torch.Tensor and hasattr(t, "qdata")


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``[t]``, or a tensor subclass's inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = flatten()
    return [leaf for n in names for leaf in plain_tensors(getattr(t, n))]


def map_plain(t: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to each plain tensor of ``t`` (:func:`plain_tensors`), ``t``'s type rebuilt around the results."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return fn(t.detach() if isinstance(t, torch.nn.Parameter) else t)
    names, context = flatten()
    inner = {n: map_plain(getattr(t, n), fn) for n in names}
    return type(t).__tensor_unflatten__(inner, context, t.shape, t.stride())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``'s data (a quantised tensor: its values and scales)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in plain_tensors(t))


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``qdata * scale`` (one scale per output row) in ``dtype``, as torchao's weight-only linear
    computes it; a new tensor of ``weight``'s shape, alive for the one product that needs it."""
    qdata, scale = weight.qdata, weight.scale
    w = qdata.to(dtype)
    return w.mul_(scale.to(dtype).reshape(qdata.shape[0], *([1] * (qdata.dim() - 1))))


# --------------------------------------------------------------------------------------------------
# The quantised Linear
# --------------------------------------------------------------------------------------------------


class _FrozenQuantizedLinear(torch.autograd.Function):
    """``x W^T + b`` with a frozen quantised ``W``: gradient to ``x`` only, nothing saved but a reference.

    ``apply(x, module)``: the module (not its weight) is the argument, so that autograd never sees the
    quantised tensor as an input; its weight is read once, here, so a block offloaded afterwards
    (``engine/offload.py``) still backpropagates through the copy its forward used.
    """

    @staticmethod
    def forward(ctx, x, module):
        weight, bias = module.weight, module.bias
        ctx.weight = weight
        return F.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None
        return dy @ dequantize(ctx.weight, dy.dtype), None


class QuantizedLinear(torch.nn.Linear):
    """A frozen ``nn.Linear`` whose weight is quantised (:func:`quantize_frozen` sets the class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        amp = autocast_dtype(x.device.type)  # the product runs in the autocast dtype, as F.linear's would
        if amp is not None:
            x = x.to(amp)
        return _FrozenQuantizedLinear.apply(x, self)


def is_quantized_linear(module) -> bool:
    return isinstance(module, QuantizedLinear)


def _quantizer(mode: str):
    int8, float8, per_row = _torchao()
    if mode == "int8":
        return lambda w: int8.from_hp(w, per_row())
    if mode == "fp8":
        return lambda w: float8.from_hp(w, float8_dtype=torch.float8_e4m3fn, granularity=per_row())
    raise QuantizationError(f"--frozen-quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")


def quantize_frozen(model: torch.nn.Module, mode: str) -> int:
    """Quantise every frozen ``nn.Linear`` of ``model`` (LoRA's own layers excepted) in place; return how many.

    ``mode`` ``none`` does nothing. The weights are quantised from the dtype they have (quantise
    before casting to half precision: the scales then come from the full-precision values). Works on
    the meta device (shapes only), which is how the VRAM planner counts the bytes.
    """
    if mode == "none":
        return 0
    make = _quantizer(mode)
    count = 0
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear or "lora_" in name or module.weight.requires_grad:
            continue
        with torch.no_grad():
            module.weight = torch.nn.Parameter(make(module.weight.detach()), requires_grad=False)
        module.__class__ = QuantizedLinear
        count += 1
    return count


def lora_on_quantized_base(layer, x: torch.Tensor, adapter_rows: int | None) -> torch.Tensor:
    """A fused LoRA layer whose base Linear is quantised: the base on every row, plus peft's delta
    ``scale * B(A(dropout(x)))`` on the first ``adapter_rows`` rows (``None``: every row)."""
    name = layer.active_adapters[0]
    y = layer.get_base_layer()(x)
    n = x.shape[0] if adapter_rows is None else int(adapter_rows)
    if n == 0:
        return y
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    xa = x if n == x.shape[0] else x[:n]
    if autocast_dtype(x.device.type) is None:  # under autocast the products cast x themselves
        xa = xa.to(lora_A.weight.dtype)
    delta = lora_B(lora_A(layer.lora_dropout[name](xa))) * layer.scaling[name]
    if n == x.shape[0]:
        return y + delta.to(y.dtype)
    return torch.cat([y[:n] + delta.to(y.dtype), y[n:]])
