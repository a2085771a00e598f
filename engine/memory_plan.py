"""Memory plan (docs/design.md §6): attention backend, gradient checkpointing, precision, compile,
channels_last, fused AdamW, applied to a diffusers UNet carrying a LoRA adapter.

    plan = MemoryPlan(precision="bf16", gradient_checkpointing=True)
    ctx = apply_memory_plan(unet, plan, device)          # attention, checkpointing, casts, layout
    optimizer = make_optimizer(lora_parameters(unet), 1e-4, plan, device)
    with ctx.autocast():
        loss = loss_fn(ctx.unet, batch)[0]               # the step's loss (engine/batch.py StepLoss)
    if ctx.scaler is not None:                           # fp16: loss scaling
        ctx.scaler.scale(loss).backward(); ctx.scaler.step(optimizer); ctx.scaler.update()
    else:
        loss.backward(); optimizer.step()

Precision means: frozen weights stored in half precision (bf16/fp16), LoRA master weights and
their optimizer state in fp32, the forward under autocast. Every API that changed between torch
2.4 and 2.13 is feature-checked here (no version pins).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from cat_engine.engine.batch import CatBatch
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import denoiser_family
from cat_engine.engine.quantize import QUANT_MODES, check_mode, is_quantized, quantize_frozen

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
# The one name -> dtype map: the short names of --precision and the torch names of --dtype.
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# torch.compile modes of --compile (a plain --compile, or compile: true, means "default").
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# Relative tolerance of the compiled-vs-eager LoRA gradient check, per compute precision.
# fp32 differences come from reordered sums (~1e-5); bf16 keeps 8 bits of mantissa, so two
# correct paths that round differently can differ by a few 1e-3 per element.
COMPILE_RTOL = {"fp32": 1e-3, "bf16": 3e-2, "fp16": 1e-2}


class MemoryPlanError(CatEngineError):
    """A plan that cannot run here (missing backend, unsupported precision); the message says why."""


@dataclass(frozen=True)
class MemoryPlan:
    """The memory/speed knobs of one training run.

    ``precision``: ``fp32``, ``bf16`` (autocast; falls back to fp16 on GPUs without bf16),
    ``fp16`` (autocast + loss scaling, CUDA only), or ``auto`` (bf16/fp16 on CUDA, fp32 elsewhere).
    ``fused_adamw``: ``None`` means auto (fused on CUDA when this torch supports it).
    ``compile``: ``False``, or a ``torch.compile`` mode of :data:`COMPILE_MODES` (``True`` means
    ``"default"``).
    ``frozen_quant``: frozen weights in 8 bits, ``none``, ``int8`` or ``fp8`` (engine/quantize.py).
    ``offload``: a transformer's blocks in CPU memory, each on the device while it runs
    (engine/offload.py); needs ``gradient_checkpointing``.
    """

    attention: str = "sdpa"
    gradient_checkpointing: bool = False
    precision: str = "fp32"
    compile: bool | str = False
    channels_last: bool = False
    fused_adamw: bool | None = None
    frozen_quant: str = "none"
    offload: bool = False

    def __post_init__(self):
        object.__setattr__(self, "compile", compile_mode(self.compile))
        if self.attention not in ATTENTION_BACKENDS:
            raise MemoryPlanError(
                f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}"
            )
        if self.precision not in PRECISIONS:
            raise MemoryPlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.frozen_quant not in QUANT_MODES:
            raise MemoryPlanError(
                f"frozen_quant must be one of {', '.join(QUANT_MODES)}, got {self.frozen_quant!r}"
            )
        if self.offload and not self.gradient_checkpointing:
            raise MemoryPlanError(
                "--offload needs --gradient-checkpointing: without it autograd keeps every block's "
                "weights on the device for backward"
            )

    def describe(self) -> str:
        parts = [self.precision, self.attention, "ckpt" if self.gradient_checkpointing else "no-ckpt"]
        if self.compile:
            parts.append("compile" if self.compile == "default" else f"compile {self.compile}")
        if self.channels_last:
            parts.append("channels_last")
        if self.frozen_quant != "none":
            parts.append(self.frozen_quant)
        if self.offload:
            parts.append("offload")
        return " ".join(parts)


def compile_mode(value) -> bool | str:
    """``False`` or a mode of :data:`COMPILE_MODES` from what a flag or YAML gives: a mode, a bool,
    ``None``, or the strings true/false."""
    if (
        value is None
        or value is False
        or (isinstance(value, str) and value.lower() in ("false", "no", "off", ""))
    ):
        return False
    if value is True or (isinstance(value, str) and value.lower() in ("true", "yes", "on")):
        return "default"
    if value in COMPILE_MODES:
        return value
    raise MemoryPlanError(f"compile must be one of {', '.join(COMPILE_MODES)} (or true/false), got {value!r}")


@dataclass(frozen=True)
class Precision:
    """What a precision choice means on one device (see :func:`resolve_precision`)."""

    name: str  # "fp32" | "bf16" | "fp16" after resolving "auto" and fallbacks
    compute_dtype: torch.dtype  # autocast dtype; float32 means no autocast
    frozen_dtype: torch.dtype  # storage dtype of the frozen (non-LoRA) weights
    loss_scaling: bool

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != torch.float32


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _cuda_bf16_supported() -> bool:
    check = getattr(torch.cuda, "is_bf16_supported", None)
    return bool(check()) if check is not None else False


def resolve_precision(plan: MemoryPlan, device) -> Precision:
    """Resolve ``plan.precision`` for ``device``.

    CUDA: bf16 autocast when the GPU supports it, else fp16 autocast with loss scaling (with a
    warning when bf16 was asked for). CPU: fp32 by default; bf16 is allowed (CPU autocast
    supports it) but warned about as slow; fp16 is refused (no loss scaling worth having there).
    """
    device = _device(device)
    name = plan.precision
    if name == "auto":
        name = ("bf16" if _cuda_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not _cuda_bf16_supported():
        warnings.warn("this GPU has no bf16 support; using fp16 with loss scaling instead", stacklevel=2)
        name = "fp16"
    if name == "fp16" and device.type != "cuda":
        raise MemoryPlanError(
            f"fp16 training needs a CUDA device (loss scaling); on {device.type} use bf16 or fp32"
        )
    if name == "bf16" and device.type == "cpu":
        warnings.warn(
            "bf16 on CPU: autocast works, but most CPUs have no fast bf16 matmul, so expect it to be "
            "slower than fp32; it saves memory only",
            stacklevel=2,
        )
    if name == "fp32":
        return Precision("fp32", torch.float32, torch.float32, loss_scaling=False)
    return Precision(name, DTYPES[name], DTYPES[name], loss_scaling=name == "fp16")


def autocast_factory(precision: Precision, device) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable returning a fresh autocast context (or a no-op one for fp32)."""
    if not precision.autocast:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=_device(device).type, dtype=precision.compute_dtype)


def make_grad_scaler(device):
    """A loss scaler for fp16: ``torch.amp.GradScaler`` where it exists, else the older CUDA one."""
    device_type = _device(device).type
    amp = getattr(torch, "amp", None)
    if amp is not None and hasattr(amp, "GradScaler"):
        try:
            return amp.GradScaler(device_type)
        except TypeError:  # an early torch.amp.GradScaler without the device argument
            pass
    return torch.cuda.amp.GradScaler()


# --- attention ---------------------------------------------------------------------------------


def xformers_problem(device="cpu") -> str | None:
    """``None`` when xformers imports and computes a correct tiny attention on ``device``, else why not."""
    try:
        import xformers.ops as xops
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken build raising anything at import
        return f"xformers is not installed or does not import ({type(exc).__name__}: {exc}); pip install xformers, or use --attention sdpa"
    device = _device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (
            torch.randn(1, 8, 2, 16, generator=gen).to(device, dtype) for _ in range(3)
        )  # [B, M, H, K]
        out = xops.memory_efficient_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float()
        ).transpose(1, 2)
        err = (out.float() - ref).abs().max().item()
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable here
        return f"xformers is installed but memory_efficient_attention fails on {device} ({type(exc).__name__}: {exc}); use --attention sdpa"
    if not err < 1e-2:
        return f"xformers is installed but gives wrong attention on {device} (max abs err {err:.2e}); use --attention sdpa"
    return None


def set_attention(unet, backend: str):
    """Set every attention processor of ``unet`` to ``backend``; return the UNet.

    ``sdpa``: ``AttnProcessor2_0`` (PyTorch's fused attention: flash / memory-efficient kernels).
    ``math``: ``AttnProcessor`` (explicit scores; slowest, most memory, always works).
    ``xformers``: ``XFormersAttnProcessor``, only after a real run on a tiny tensor succeeds;
    otherwise :class:`MemoryPlanError` says what failed.
    """
    from diffusers.models import attention_processor as ap

    family = denoiser_family(unet)
    if family is not None:  # a diffusion transformer keeps its family's processors, which run SDPA
        if backend != "sdpa":
            raise MemoryPlanError(
                f"--attention {backend}: {family.title} runs its own attention processors (PyTorch SDPA); "
                "use --attention sdpa"
            )
        return unet
    if backend == "sdpa":
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            raise MemoryPlanError("this torch has no scaled_dot_product_attention; use --attention math")
        processor = ap.AttnProcessor2_0()
    elif backend == "math":
        processor = ap.AttnProcessor()
    elif backend == "xformers":
        param = next(unet.parameters(), None)
        problem = xformers_problem(param.device if param is not None else "cpu")
        if problem is not None:
            raise MemoryPlanError(problem)
        processor = ap.XFormersAttnProcessor()
    else:
        raise MemoryPlanError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    unet.set_attn_processor(processor)
    return unet


# --- weights -----------------------------------------------------------------------------------


def is_lora_name(name: str) -> bool:
    return "lora_" in name


NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm)


def cast_frozen_weights(unet, dtype: torch.dtype):
    """Store frozen weights in ``dtype``; keep LoRA parameters (names containing ``lora_``) and the
    normalisation layers' scales and shifts in fp32.

    Parameters keep their identity (``.data`` is replaced), so an optimizer built before stays
    valid. Half-precision frozen weights need autocast in the forward: peft's LoRA layers then run
    with fp32 LoRA weights next to half base weights (autocast casts each matmul's inputs).
    Normalisation layers stay fp32 because a norm can see an fp32 input before any autocast op has
    run (the built-in UNet's text-embedding ``LayerNorm`` reads the fp32 text embeddings), and CPU
    autocast leaves norms alone: fp32 input with half weights is an error there, while fp32 weights
    take either input. CUDA autocast computes norms in fp32 anyway, so nothing changes there.
    """
    norms = {id(p) for m in unet.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for name, param in unet.named_parameters():
            target = torch.float32 if is_lora_name(name) or id(param) in norms else dtype
            if param.is_floating_point() and param.dtype != target and not is_quantized(param):
                param.data = param.data.to(target)
        for name, buf in unet.named_buffers():
            if buf.is_floating_point() and not is_lora_name(name) and buf.dtype != dtype:
                buf.data = buf.data.to(dtype)
    return unet


# --- applying a plan ---------------------------------------------------------------------------


@dataclass
class MemoryContext:
    """What the training step needs after :func:`apply_memory_plan`."""

    unet: torch.nn.Module  # the module to call (possibly compiled in place)
    plan: MemoryPlan  # with precision resolved to what actually runs
    precision: Precision
    autocast: Callable[[], contextlib.AbstractContextManager]  # ``with ctx.autocast(): ...``
    scaler: object | None  # a GradScaler for fp16, else None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.compute_dtype


def enable_checkpointing(unet, checkpoint_func: Callable | None = None):
    """diffusers gradient checkpointing, with a custom checkpoint function where supported."""
    if checkpoint_func is None:
        unet.enable_gradient_checkpointing()
    elif "gradient_checkpointing_func" in inspect.signature(unet.enable_gradient_checkpointing).parameters:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_func)
    else:
        raise MemoryPlanError(
            "this diffusers cannot take a custom gradient checkpointing function; upgrade diffusers"
        )
    return unet


def apply_memory_plan(
    unet, plan: MemoryPlan, device, *, check_inputs: CatBatch | None = None, checkpoint_func=None
) -> MemoryContext:
    """Apply ``plan`` to ``unet`` in place (move to ``device``, attention, checkpointing, casts, layout).

    ``plan.compile`` needs ``check_inputs`` (see :func:`compile_unet`); it is applied last so the
    gradient check runs on the final module. ``checkpoint_func`` replaces diffusers' default
    checkpoint function (the split-batch executor passes its own, docs/design.md §4).
    """
    device = _device(device)
    precision = resolve_precision(plan, device)
    plan = replace(plan, precision=precision.name, fused_adamw=fused_adamw_wanted(plan, device))
    check_mode(plan.frozen_quant, device)
    # Quantise and cast before moving: the full-precision weights need not fit the device.
    quantize_frozen(unet, plan.frozen_quant)
    cast_frozen_weights(unet, precision.frozen_dtype)
    place_on_device(unet, plan, device)
    set_attention(unet, plan.attention)
    if plan.gradient_checkpointing:
        enable_checkpointing(unet, checkpoint_func)
    if plan.channels_last:
        unet.to(memory_format=torch.channels_last)
    autocast = autocast_factory(precision, device)
    ctx = MemoryContext(
        unet=unet,
        plan=plan,
        precision=precision,
        autocast=autocast,
        scaler=make_grad_scaler(device) if precision.loss_scaling else None,
        device=device,
    )
    if plan.compile:
        if check_inputs is None:
            raise MemoryPlanError(
                "compile needs check_inputs: small example inputs to compare gradients with eager"
            )
        ctx.unet = compile_unet(unet, plan, check_inputs, autocast=autocast)
    return ctx


def place_on_device(unet, plan: MemoryPlan, device) -> None:
    """``unet.to(device)``; with ``plan.offload``, the blocks' frozen tensors stay in CPU memory."""
    if not plan.offload:
        unet.to(device)
        return
    from cat_engine.engine.offload import BlockOffload, block_offload

    if denoiser_family(unet) is None:
        raise MemoryPlanError("--offload moves a diffusion transformer's blocks; a UNet cannot offload")
    if block_offload(unet) is None:
        BlockOffload(unet, device)


# --- optimizer ---------------------------------------------------------------------------------


def fused_adamw_wanted(plan: MemoryPlan, device) -> bool:
    if plan.fused_adamw is not None:
        return bool(plan.fused_adamw)
    return _device(device).type == "cuda"


def make_optimizer(
    params, lr: float, plan: MemoryPlan, device, name: str = "adamw", **kwargs
) -> torch.optim.Optimizer:
    """AdamW over ``params``; fused when the plan wants it and this torch supports it here.

    The fused kernel is feature-checked (the ``fused`` argument exists, and construction accepts
    these parameters on this device); when it is refused we warn and use the default AdamW.
    Another ``name`` (``adamw8bit``, ``prodigy``) comes from ``engine/optimizers.py``.
    """
    params = list(params)
    if name != "adamw":
        from cat_engine.engine.optimizers import make_extra_optimizer

        return make_extra_optimizer(name, params, lr, **kwargs)
    if fused_adamw_wanted(plan, device):
        if "fused" in inspect.signature(torch.optim.AdamW).parameters:
            try:
                return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
            except (RuntimeError, ValueError, TypeError) as exc:
                reason = str(exc)
        else:
            reason = "this torch's AdamW has no fused option"
        warnings.warn(f"fused AdamW unavailable ({reason}); using the default AdamW", stacklevel=2)
    return torch.optim.AdamW(params, lr=lr, **kwargs)


# --- torch.compile with a gradient check -------------------------------------------------------


def unet_blocks(unet) -> list[torch.nn.Module]:
    """The UNet's down, mid and up blocks: the units compiled by ``per_block`` compilation."""
    blocks = (
        list(unet.down_blocks)
        + ([unet.mid_block] if unet.mid_block is not None else [])
        + list(unet.up_blocks)
    )
    return blocks


def compiled_modules(unet) -> list[torch.nn.Module]:
    """Modules of ``unet`` compiled in place (``Module.compile``)."""
    return [m for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _compile_in_place(modules, **compile_kwargs) -> None:
    # Module.compile keeps parameter names (no ``_orig_mod.`` prefix), so LoRA saving and
    # optimizer state are unaffected, and undoing it is resetting ``_compiled_call_impl``.
    for m in modules:
        m.compile(**compile_kwargs)


def _uncompile(modules) -> None:
    for m in modules:
        m._compiled_call_impl = None


def lora_gradients(call: Callable, params, autocast=contextlib.nullcontext) -> list[torch.Tensor]:
    """Run ``call()`` (returns the UNet output) forward and backward; return the params' gradients.

    The loss projects the output on a fixed random tensor, so every output element matters and
    no symmetry hides a wrong gradient. ``.grad`` is left as it was found (None).
    """
    params = list(params)
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with autocast():
            out = call()
        gen = torch.Generator(device="cpu").manual_seed(1234)
        probe = torch.randn(out.shape, generator=gen).to(out.device)
        (out.float() * probe).sum().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().float().clone() for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def max_relative_error(grads, reference) -> float:
    """Largest per-tensor ``||g - ref|| / ||ref||``; tensors whose reference is (near) zero are
    measured against 1e-3 of the largest reference norm instead, so a wrong non-zero shows."""
    norms = [r.norm().item() for r in reference]
    floor = 1e-3 * max(norms, default=0.0) or 1e-12
    worst = 0.0
    for g, r, n in zip(grads, reference, norms):
        worst = max(worst, (g - r).norm().item() / max(n, floor))
    return worst


@contextlib.contextmanager
def _nonzero_lora_b(unet):
    """Temporarily give all-zero ``lora_B`` weights small random values (restored on exit).

    With B = 0 (peft's init) the gradient of every ``lora_A`` is exactly zero in both paths, so a
    wrong A-gradient could not show in the check.
    """
    changed = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name and p.requires_grad and not p.any():
                changed.append(p)
                p.copy_((torch.randn(p.shape, generator=gen) * 1e-2).to(p.device, p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p in changed:
                p.zero_()


def compile_unet(
    unet,
    plan: MemoryPlan,
    check_inputs: CatBatch,
    *,
    backend: str = "inductor",
    per_block: bool = False,
    autocast: Callable = contextlib.nullcontext,
    rtol: float | None = None,
    **compile_kwargs,
):
    """``torch.compile`` the UNet in place, in ``plan.compile``'s mode, then prove its LoRA
    gradients equal eager ones.

    ``check_inputs``: a small :class:`~cat_engine.engine.batch.CatBatch`; one forward+backward of
    the UNet on its token rows (``noisy_latents``, ``timesteps``, ``token_embeds``,
    ``added_cond_kwargs``) runs eager, then compiled: once in mode ``default``, three times in the
    modes that record CUDA graphs (``reduce-overhead``, ``max-autotune``: the first runs record,
    the last replays), every run checked. On a mismatch above ``rtol`` (default per precision, 1e-3
    for fp32), or when compiling fails, it warns loudly, undoes the compilation and returns the
    eager UNet (docs/design.md §6: inductor on CPU is known to get LoRA gradients wrong).

    ``per_block=False`` (default) compiles the whole UNet as one graph, which compiled faster than
    per block (down/mid/up blocks) on the tiny UNet (bench/results/README-figures-from-code.md).

    The check runs on ``check_inputs``' shapes; the training shapes recompile (new graph) on the
    first real step and are trusted by the same backend. Pass training-sized inputs when affordable.
    """
    from cat_engine.engine.lora import lora_parameters

    params = lora_parameters(unet)
    if not params:
        raise MemoryPlanError("compile_unet: the UNet has no trainable LoRA parameters to check")
    if not hasattr(torch.nn.Module, "compile"):
        warnings.warn("this torch has no nn.Module.compile; training eager", stacklevel=2)
        return unet
    rtol = COMPILE_RTOL.get(plan.precision, 1e-3) if rtol is None else rtol
    mode = plan.compile or "default"
    if mode != "default" and backend == "inductor":  # modes are inductor's
        compile_kwargs.setdefault("mode", mode)
    runs = 1 if mode == "default" else 3
    modules = unet_blocks(unet) if per_block else [unet]
    b = check_inputs

    def forward():  # the same call before and after: compilation is in place
        return unet_forward(unet, b.noisy_latents, b.timesteps, b.token_embeds, b.added_cond_kwargs)

    with _nonzero_lora_b(unet):
        eager = lora_gradients(forward, params, autocast)
        try:
            _compile_in_place(modules, backend=backend, **compile_kwargs)
            compiled = [lora_gradients(forward, params, autocast) for _ in range(runs)]
        except Exception as exc:  # noqa: BLE001 - inductor needs a C compiler, may hit unsupported ops, ...
            _uncompile(modules)
            warnings.warn(
                f"torch.compile failed on this torch/device ({type(exc).__name__}: {exc}); falling back to eager",
                stacklevel=2,
            )
            return unet
    err = max(max_relative_error(grads, eager) for grads in compiled)
    if not err <= rtol:  # also catches NaN
        _uncompile(modules)
        message = (
            f"torch.compile gave wrong LoRA gradients on this torch/device (max rel err {err:.3g}, "
            f"tolerance {rtol:g}, backend {backend}, mode {mode}); falling back to eager"
        )
        warnings.warn(message, stacklevel=2)
        print(f"WARNING: {message}", flush=True)  # loud: training continues, slower
        return unet
    return unet
