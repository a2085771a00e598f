"""VRAM estimator (docs/design.md §6): predict the peak GPU memory of one training step.

    loss_fn = cat_engine.cat.loss.step_loss(cat_weight=1.0)      # the step to measure, from the caller
    est = estimate_peak("sd15", 512, 1, MemoryPlan(precision="bf16"), rank=16, loss_fn=loss_fn)
    est.total, est.breakdown()          # weights, lora, grads, optimizer, activations, workspace
    plan, est = best_plan("sdxl", 1024, 1, budget_bytes=12 * GiB, rank=16, loss_fn=loss_fn)

What is counted, and how:

- ``weights``: frozen UNet parameters and buffers, in the plan's frozen dtype (half for bf16/fp16).
- ``lora``, ``grads``, ``optimizer``: LoRA master weights and their gradients (fp32), and the
  optimizer's state (``engine/optimizers.py``: AdamW's two fp32 moments, AdamW8bit's 8-bit moments
  with their block scales, Prodigy's four fp32 buffers). Gradients are counted as resident for the whole step (they exist only late
  in backward with ``zero_grad(set_to_none=True)``; they are small, so the error is small and safe).
- ``activations`` and ``workspace`` are **measured, not guessed**: the real training step (the
  caller's loss function on a :class:`~cat_engine.engine.batch.CatBatch`, forward and backward)
  runs on the full-size UNet on the ``meta`` device (shapes and dtypes, no data, no memory)
  under a dispatch mode that follows every tensor storage from allocation to release, the way a
  caching allocator sees them. ``activations`` is what is alive when backward starts (everything
  the autograd graph holds, including checkpoint inputs, which ``saved_tensors_hooks`` would
  miss); ``workspace`` is the measured transient peak above that (gradient buffers in backward,
  checkpoint recomputation, attention scores with math attention, the no-grad base pass) plus
  :data:`KERNEL_WORKSPACE` for cuBLAS/cuDNN workspaces, which the meta run cannot see.
- CUDA specifics are reproduced on meta: autocast is emulated with CUDA's cast policy (matmuls and
  convolutions in half, group/layer norm and softmax in fp32: the fp32 norm outputs are a large
  share of bf16 activation memory), and SDPA is run as the flash kernel (saves q, k, v, out and
  the log-sum-exp), not as the math decomposition meta would otherwise take.
- Not counted: the CUDA context (never in ``torch.cuda.max_memory_allocated``; see
  :data:`CUDA_CONTEXT_RESERVE`, which ``fits``/``best_plan`` add), allocator fragmentation
  (use ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), the VAE and text encoders (off the
  GPU once latents and embeddings are cached, docs/design.md §6), ``torch.compile``'s savings.

Estimates are cached per (model, resolution, batch, precision, checkpointing, attention, rank,
loss function); a ``functools.partial`` counts as the same loss function as an equal one.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from cat_engine.engine.batch import CatBatch, StepLoss
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.memory_plan import DTYPES, MemoryPlan, cast_frozen_weights, is_lora_name, set_attention
from cat_engine.engine.unet_configs import ModelSpec, resolve_model
from cat_engine.kernels.lora_linear import emulated_autocast

GiB = 2**30
MiB = 2**20
# cuBLAS keeps a workspace per handle/stream (up to 32 MiB on Hopper) and cuDNN convolution
# algorithms ask for scratch space; both come from the caching allocator, so
# max_memory_allocated sees them but the meta run cannot. A fixed allowance, not a measurement.
KERNEL_WORKSPACE = 128 * MiB
# The CUDA context and loaded kernels occupy the card but are not in max_memory_allocated; a plan
# "fits" a budget only with this much left over.
CUDA_CONTEXT_RESERVE = 512 * MiB
# The caching allocator hands out blocks in multiples of 512 bytes.
_ALLOC_ROUND = 512


@dataclass(frozen=True)
class VramEstimate:
    """Predicted peak of ``torch.cuda.max_memory_allocated`` for one training step, in bytes."""

    model: str
    resolution: int
    batch: int
    rank: int
    plan: MemoryPlan
    weights: int
    lora: int
    grads: int
    optimizer: int
    activations: int
    workspace: int
    method: str = "meta"  # how activations were measured (see estimate_peak)

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.grads + self.optimizer + self.activations + self.workspace

    def breakdown(self) -> dict[str, int]:
        keys = ("weights", "lora", "grads", "optimizer", "activations", "workspace")
        return {k: getattr(self, k) for k in keys} | {"total": self.total}

    def fits(self, budget_bytes: int, reserve: int = CUDA_CONTEXT_RESERVE) -> bool:
        """Whether the step fits a card of ``budget_bytes`` with ``reserve`` left for the CUDA context."""
        return self.total + reserve <= budget_bytes


# --- models ------------------------------------------------------------------------------------


_META_UNETS: dict[tuple[str, int, bool], torch.nn.Module] = {}


def _meta_lora_unet(spec: ModelSpec, rank: int, fused: bool = True):
    """The full-size UNet with a rank-``rank`` LoRA adapter, on meta; built once per (config, rank).

    ``fused``: LoRA layers fused as training runs them, so the CAT loss takes the split-batch path;
    otherwise peft's layers and the three-call reference.
    """
    key = (spec.config_json, rank, fused)
    if key not in _META_UNETS:
        from diffusers import UNet2DConditionModel

        from cat_engine.engine.lora import add_lora, fuse_lora

        with torch.device("meta"):
            unet = add_lora(UNet2DConditionModel.from_config(spec.config), rank=rank)
        _META_UNETS[key] = fuse_lora(unet) if fused else unet
    return _META_UNETS[key]


# --- meta-device measurement -------------------------------------------------------------------


def _rounded(nbytes: int) -> int:
    return -(-nbytes // _ALLOC_ROUND) * _ALLOC_ROUND


class _LiveBytes(TorchDispatchMode):
    """Follows every storage an op allocates until it is freed; keeps the current and peak sum.

    Storages in ``known`` (weights, created before the step) are not counted. Views and in-place
    results share a counted storage, so they add nothing, as on a real allocator.
    """

    def __init__(self, known: set[int]):
        super().__init__()
        self.known = known
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.known:
            return
        nbytes = _rounded(storage.nbytes())
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _storage_keys(tensors) -> set[int]:
    return {t.untyped_storage()._cdata for t in tensors}


# Autocast's cast policy, per device type (aten/src/ATen/autocast_mode.cpp), restricted to the ops
# a diffusers UNet and the CAT loss call. Meta tensors have no autocast dispatch key, so a
# function mode (above autograd, where autocast sits) applies the same casts.
def _policy(device_type: str):
    lower = {
        F.linear, F.conv2d, torch.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.mm,
        torch.einsum, F.scaled_dot_product_attention,
    }  # fmt: skip
    fp32 = {F.mse_loss}
    if device_type == "cuda":
        fp32 |= {
            F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm, F.softmax, torch.softmax,
            torch.Tensor.softmax, F.log_softmax, torch.exp, torch.Tensor.exp, torch.log, torch.rsqrt,
        }  # fmt: skip
    return lower, fp32


def _cast(tree, dtype):
    def cast(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
            return x.to(dtype)
        return x

    return tree_map(cast, tree)


class _MetaCuda(TorchFunctionMode):
    """Makes a meta run allocate what a CUDA run allocates: autocast casts and flash SDPA."""

    def __init__(
        self, autocast_dtype: torch.dtype | None, device_type: str = "cuda", flash_sdpa: bool = True
    ):
        super().__init__()
        self.dtype = autocast_dtype
        self.lower, self.fp32 = _policy(device_type)
        self.flash_sdpa = flash_sdpa

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None:
            if func in self.lower:
                args, kwargs = _cast((args, kwargs), self.dtype)
            elif func in self.fp32:
                args, kwargs = _cast((args, kwargs), torch.float32)
        if func is F.scaled_dot_product_attention and self.flash_sdpa:
            return _flash_sdpa(*args, **kwargs)
        if func is torch.equal and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            # Meta tensors have no values. The split-batch executor compares small tensors (the
            # time embedding) to share rows between CAT groups; "different" is the answer that
            # never underestimates (shared rows only save memory), except for a view compared with
            # itself, which is equal whatever the values.
            a, b = args[0], args[1]
            return (
                a.untyped_storage()._cdata == b.untyped_storage()._cdata
                and a.storage_offset() == b.storage_offset()
                and a.shape == b.shape
                and a.stride() == b.stride()
            )
        return func(*args, **kwargs)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    # On meta, SDPA decomposes to the math path (it saves the [N, N] probabilities). CUDA runs
    # flash / memory-efficient kernels, which save q, k, v, out and a [B, H, N] fp32 log-sum-exp:
    # the CPU flash op saves exactly that set, and has meta kernels forward and backward.
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )[0]


def _step_inputs(spec: ModelSpec, resolution: int, batch: int, device) -> CatBatch:
    side = resolution // spec.vae_scale_factor
    # Latents and cached text embeddings are fp32 (cast by autocast where they are used).
    latents = torch.zeros(batch, 4, side, side, device=device)
    added = None
    if spec.pooled_width is not None:
        added = {
            "text_embeds": torch.zeros(batch, spec.pooled_width, device=device),
            "time_ids": torch.zeros(batch, 6, device=device),
        }
    return CatBatch(
        noisy_latents=latents,
        timesteps=torch.zeros(batch, dtype=torch.long, device=device),
        token_embeds=torch.zeros(batch, spec.text_tokens, spec.text_width, device=device),
        plain_embeds=torch.zeros(batch, spec.text_tokens, spec.text_width, device=device),
        target=torch.zeros_like(latents),
        added_cond_kwargs=added,
    )


def measure_step(unet, spec: ModelSpec, resolution: int, batch: int, plan: MemoryPlan, loss_fn: StepLoss,
                 *, device="meta", device_type: str = "cuda") -> tuple[int, int]:  # fmt: skip
    """Run one training step (``loss_fn(unet, batch)``, forward + backward); return ``(at_backward, peak)``.

    ``loss_fn`` is the step's loss (:data:`~cat_engine.engine.batch.StepLoss`: its first output is
    the differentiable loss) on a :class:`~cat_engine.engine.batch.CatBatch` of ``batch`` rows.
    ``at_backward``: bytes alive when backward starts; ``peak``: the highest count during the step;
    both exclude the weights. ``device="meta"`` with ``device_type="cuda"`` reproduces a CUDA
    run's allocations; a real device (CPU) with its own ``device_type`` is how this is validated.
    """
    from cat_engine.engine.lora import lora_parameters

    half = DTYPES[plan.precision] if plan.precision in ("bf16", "fp16") else None
    unet.train()
    # xformers saves the same tensors as flash SDPA (q, k, v, out, lse); model it as sdpa.
    set_attention(unet, "math" if plan.attention == "math" else "sdpa")
    if plan.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    cast_frozen_weights(unet, half or torch.float32)
    known = _storage_keys(list(unet.parameters()) + list(unet.buffers()))
    tracker = _LiveBytes(known)
    is_meta = torch.device(device).type == "meta"
    real_autocast = (
        torch.autocast(device_type, dtype=half)
        if (half and not is_meta)
        else torch.autocast("cpu", enabled=False)
    )
    try:
        emulated = half if is_meta else None
        with (
            tracker,
            _MetaCuda(emulated, device_type, flash_sdpa=is_meta),
            # meta tensors have no autocast: the fused LoRA op must see the emulated one
            emulated_autocast("meta", emulated),
            real_autocast,
        ):
            inputs = _step_inputs(spec, resolution, batch, device)
            out = loss_fn(unet, inputs)  # kept whole through backward, as a training loop keeps it
            del inputs
            at_backward = tracker.current
            _run_backward(out[0])
            del out
    finally:
        for p in lora_parameters(unet):
            p.grad = None
    return at_backward, tracker.peak


def _run_backward(loss: torch.Tensor) -> None:
    # Straight to the autograd engine: ``Tensor.backward`` goes through ``__torch_function__``,
    # and a function mode is switched off while it handles a call, so checkpoint recomputation
    # inside backward would run without the autocast casts.
    torch.autograd.Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), True, True
    )


_MEASURED: dict[tuple, tuple[int, int, str]] = {}


def _loss_key(loss_fn: StepLoss):
    """Equal for the same step: a ``functools.partial`` by its function and bound arguments."""
    if isinstance(loss_fn, functools.partial):
        return (_loss_key(loss_fn.func), loss_fn.args, tuple(sorted(loss_fn.keywords.items())))
    return loss_fn


def _measure_cached(
    spec: ModelSpec, resolution: int, batch: int, plan: MemoryPlan, rank: int, loss_fn: StepLoss
):
    """``(at_backward, peak, method)``, trying in turn: the split-batch step (as training runs it),
    the three-call reference step, then two small resolutions extrapolated by pixel count."""
    key = (spec.config_json, resolution, batch, plan.precision, plan.gradient_checkpointing,
           plan.attention == "math", rank, _loss_key(loss_fn))  # fmt: skip
    if key in _MEASURED:
        return _MEASURED[key]
    failures = []
    # The split-batch path saves about what the three-call reference saves (docs/design.md §4),
    # so the reference is a close stand-in when only the split-batch code fails on meta.
    for fused, method in ((True, "meta"), (False, "meta, three-call reference")):
        try:
            at_backward, peak = measure_step(
                _meta_lora_unet(spec, rank, fused), spec, resolution, batch, plan, loss_fn
            )
        except Exception as exc:  # noqa: BLE001 - an op without a meta kernel, code that is not meta-safe
            failures.append(f"{method}: {type(exc).__name__}: {exc}")
            continue
        if failures:
            warnings.warn(
                f"meta run of the split-batch step failed ({failures[0]}); used the {method}", stacklevel=3
            )
        _MEASURED[key] = (at_backward, peak, method)
        return _MEASURED[key]
    small = _small_resolution(spec)
    warnings.warn(
        f"meta run of the full step failed ({'; '.join(failures)}); measuring at {small} and {2 * small} px "
        f"and scaling by pixel count (affine fit; math attention's scores grow faster, so less exact)",
        stacklevel=3,
    )
    # Memory is affine in the pixel count (text-side tensors are fixed), so two small measurements
    # fix both terms; one measurement times the pixel ratio would also scale the fixed part.
    unet = _meta_lora_unet(spec, rank, True)
    m1 = measure_step(unet, spec, small, batch, plan, loss_fn)
    m2 = measure_step(unet, spec, 2 * small, batch, plan, loss_fn)
    units = (resolution / small) ** 2  # pixels, in units of the first measurement's

    def extrapolate(a: int, b: int) -> int:
        return int(a + (b - a) / 3 * (units - 1))  # (2 small)^2 - small^2 = 3 units

    _MEASURED[key] = (
        extrapolate(m1[0], m2[0]),
        extrapolate(m1[1], m2[1]),
        f"meta@{small}+{2 * small}px, scaled",
    )
    return _MEASURED[key]


def _small_resolution(spec: ModelSpec) -> int:
    # the smallest latent side every down-sampling level divides evenly, times 2
    levels = len(spec.config.get("block_out_channels", (0, 0, 0, 0)))
    return spec.vae_scale_factor * 2 ** (levels - 1) * 2


# --- public API --------------------------------------------------------------------------------


def _param_bytes(unet, plan: MemoryPlan) -> tuple[int, int]:
    frozen_size = 2 if plan.precision in ("bf16", "fp16") else 4
    weights = lora = 0
    for name, p in unet.named_parameters():
        if is_lora_name(name):
            lora += _rounded(p.numel() * 4)
        else:
            weights += _rounded(p.numel() * frozen_size)
    weights += sum(_rounded(b.numel() * frozen_size) for b in unet.buffers())
    return weights, lora


def _optimizer_bytes(unet, optimizer: str) -> int:
    from cat_engine.engine.optimizers import state_bytes

    return sum(
        _rounded(b)
        for name, p in unet.named_parameters()
        if is_lora_name(name)
        for b in state_bytes(optimizer, p.numel())
    )


def estimate_peak(
    model,
    resolution: int,
    batch: int,
    plan: MemoryPlan,
    rank: int = 16,
    *,
    loss_fn: StepLoss,
    optimizer: str = "adamw",
) -> VramEstimate:
    """Predict peak training memory (``torch.cuda.max_memory_allocated``) of one step.

    Args:
        model: ``sd15``/``sd21``/``sdxl``/``builtin``, a UNet config dict, or a diffusers folder.
        resolution: image side in pixels (latents are ``resolution / vae_scale_factor``).
        batch: images per step (the loss adds rows of its own, such as CAT's plain-caption and base rows).
        plan: the memory plan (precision ``auto`` is taken as bf16, the CUDA default).
        rank: LoRA rank (default targets: to_q, to_k, to_v, to_out.0).
        loss_fn: the training step's loss, ``loss_fn(unet, batch: CatBatch)`` (:data:`StepLoss`),
            e.g. ``cat_engine.cat.loss.step_loss(cat_weight)``.
        optimizer: ``adamw``, ``adamw8bit`` or ``prodigy`` (``engine/optimizers.py``), whose state is counted.
    """
    spec = resolve_model(model)
    if resolution % spec.vae_scale_factor:
        raise ValueError(f"resolution must be a multiple of {spec.vae_scale_factor}, got {resolution}")
    if plan.precision == "auto":
        plan = replace(plan, precision="bf16")
    at_backward, peak, method = _measure_cached(spec, resolution, batch, plan, rank, loss_fn)
    unet = _meta_lora_unet(spec, rank)
    weights, lora = _param_bytes(unet, plan)
    return VramEstimate(
        model=spec.name,
        resolution=resolution,
        batch=batch,
        rank=rank,
        plan=plan,
        weights=weights,
        lora=lora,
        grads=lora,
        optimizer=_optimizer_bytes(unet, optimizer),
        activations=at_backward,
        workspace=peak - at_backward + KERNEL_WORKSPACE,
        method=method,
    )


def candidate_plans(half: str = "bf16", attention: str = "sdpa") -> list[MemoryPlan]:
    """Plans in order of expected speed, fastest first.

    Half precision before fp32: bf16/fp16 matmuls run at twice the TF32 tensor-core rate or more
    and move half the bytes. Without checkpointing before with: checkpointing recomputes each
    checkpointed block's forward in backward, which costs less than falling back to fp32. Hence:
    half, half+ckpt, fp32, fp32+ckpt. ``half`` is ``fp16`` on GPUs without bf16. Math attention is
    never a candidate: slower than SDPA and larger.
    """
    return [
        MemoryPlan(attention=attention, precision=half, gradient_checkpointing=False),
        MemoryPlan(attention=attention, precision=half, gradient_checkpointing=True),
        MemoryPlan(attention=attention, precision="fp32", gradient_checkpointing=False),
        MemoryPlan(attention=attention, precision="fp32", gradient_checkpointing=True),
    ]


class NoPlanFits(CatEngineError):
    """No candidate plan fits the budget; the message gives the smallest estimate and what to change."""


def plan_candidates(model, resolution: int, batch: int, rank: int = 16, *, loss_fn: StepLoss,
                    half: str = "bf16", attention: str = "sdpa",
                    optimizer: str = "adamw") -> list[tuple[MemoryPlan, VramEstimate]]:  # fmt: skip
    """Every candidate plan with its estimate, fastest first (see :func:`candidate_plans`)."""
    return [
        (p, estimate_peak(model, resolution, batch, p, rank, loss_fn=loss_fn, optimizer=optimizer))
        for p in candidate_plans(half, attention)
    ]


def best_plan(model, resolution: int, batch: int, budget_bytes: int, rank: int = 16, *, loss_fn: StepLoss,
              half: str = "bf16", attention: str = "sdpa", reserve: int = CUDA_CONTEXT_RESERVE,
              optimizer: str = "adamw"):  # fmt: skip
    """The fastest candidate plan whose estimate plus ``reserve`` (CUDA context) fits ``budget_bytes``.

    Returns ``(MemoryPlan, VramEstimate)``; raises :class:`NoPlanFits` naming the smallest plan's
    need when none fits. ``half="fp16"`` on GPUs without bf16.
    """
    candidates = []
    for plan in candidate_plans(half, attention):  # lazily: stop at the first that fits
        est = estimate_peak(model, resolution, batch, plan, rank, loss_fn=loss_fn, optimizer=optimizer)
        if est.fits(budget_bytes, reserve):
            return plan, est
        candidates.append((plan, est))
    smallest_plan, smallest = min(candidates, key=lambda c: c[1].total)
    raise NoPlanFits(
        f"no plan fits {format_bytes(budget_bytes)} for {smallest.model} at {resolution} px, batch {batch}, "
        f"rank {rank}: the smallest ({smallest_plan.describe()}) needs {format_bytes(smallest.total)} "
        f"+ {format_bytes(reserve)} for the CUDA context; lower the resolution, batch size or rank"
    )


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"
