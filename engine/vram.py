"""VRAM estimator (docs/design.md §6): predict the peak GPU memory of one training step.

    loss_fn = cat_engine.cat.loss.step_loss(cat_weight=1.0)      # the step to measure, from the caller
    est = estimate_peak("sd15", 512, 1, MemoryPlan(precision="bf16"), rank=16, loss_fn=loss_fn)
    est.total, est.breakdown()          # weights, lora, grads, optimizer, activations, workspace
    plan, est = best_plan("sdxl", 1024, 1, budget_bytes=12 * GiB, rank=16, loss_fn=loss_fn)
    plan, est = best_plan("flux", 1024, 1, budget_bytes=12 * GiB, rank=16, loss_fn=loss_fn)

Models: the UNets and the diffusion transformers (SD3/3.5, Flux.1, Z-Image: full-size configs in
``engine/dit_configs.py``, their inputs from the family's ``example_batch``).

What is counted, and how:

- ``weights``: frozen parameters and buffers on the device, in the plan's frozen dtype (half for
  bf16/fp16; norms fp32), quantised ones (``plan.frozen_quant``) as their int8/fp8 values and
  per-row scales. With ``plan.offload`` the blocks' frozen tensors are in CPU memory
  (``offloaded``, not in the total); the copies of the blocks in flight are allocated during the
  measured step (engine/offload.py runs on meta too), so they are in ``activations``/``workspace``.
- ``lora``, ``grads``, ``optimizer``: LoRA master weights and their gradients (fp32), and the
  optimizer's state (``engine/optimizers.py``: AdamW's two fp32 moments, AdamW8bit's 8-bit moments
  with their block scales, Prodigy's four fp32 buffers). Gradients are counted as resident for the
  whole step (they exist only late
  in backward with ``zero_grad(set_to_none=True)``; they are small, so the error is small and safe).
- ``activations`` and ``workspace`` are **measured, not guessed**: the real training step (the
  caller's loss function on a :class:`~cat_engine.engine.batch.CatBatch`, forward and backward)
  runs on the full-size model on the ``meta`` device (shapes and dtypes, no data, no memory)
  under a dispatch mode that follows every tensor storage from allocation to release, the way a
  caching allocator sees them. ``activations`` is what is alive when backward starts (everything
  the autograd graph holds, including checkpoint inputs, which ``saved_tensors_hooks`` would
  miss); ``workspace`` is the measured transient peak above that (gradient buffers in backward,
  checkpoint recomputation, attention scores with math attention, the no-grad base pass) plus
  :data:`KERNEL_WORKSPACE` for cuBLAS/cuDNN workspaces, which the meta run cannot see.
- CUDA specifics are reproduced on meta (``engine/meta_memory.py``): autocast is emulated with CUDA's cast policy (matmuls and
  convolutions in half, group/layer norm and softmax in fp32: the fp32 norm outputs are a large
  share of bf16 activation memory), and SDPA is run as the flash kernel (saves q, k, v, out and
  the log-sum-exp), not as the math decomposition meta would otherwise take.
- Not counted: the CUDA context (never in ``torch.cuda.max_memory_allocated``; see
  :data:`CUDA_CONTEXT_RESERVE`, which ``fits``/``best_plan`` add), allocator fragmentation
  (use ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``), the VAE and text encoders (off the
  GPU once latents and embeddings are cached, docs/design.md §6), ``torch.compile``'s savings.

Estimates are cached per (model, resolution, batch, precision, checkpointing, attention, frozen
quantisation, offloading, rank, loss function); a ``functools.partial`` counts as the same loss
function as an equal one.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from cat_engine.engine.batch import CatBatch, StepLoss
from cat_engine.engine.dit_configs import build_transformer
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import dit_family
from cat_engine.engine.memory_plan import (
    DTYPES,
    NORM_LAYERS,
    MemoryPlan,
    cast_frozen_weights,
    is_lora_name,
    set_attention,
)
from cat_engine.engine.meta_memory import (
    LiveBytes,
    MetaCuda,
    assume_nonzero_all,
    rounded,
    run_backward,
    storage_keys,
)
from cat_engine.engine.quantize import (
    is_quantized,
    plain_tensors,
    quantize_frozen,
    tensor_bytes,
    torchao_problem,
)
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
    offloaded: int = 0  # frozen weights kept in CPU memory (block offloading), not in the total

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


_META_UNETS: dict[tuple, torch.nn.Module] = {}


def _meta_lora_unet(spec: ModelSpec, rank: int, fused: bool = True, frozen_quant: str = "none"):
    """The full-size denoiser (a UNet, or the transformer of ``spec.family`` with its family's LoRA
    targets) with a rank-``rank`` LoRA adapter, on meta; built once per (config, rank, fusing, quantisation).

    ``fused``: LoRA layers fused as training runs them, so the CAT loss takes the split-batch path;
    otherwise peft's layers and the three-call reference. ``frozen_quant``: the frozen Linear weights
    quantised as ``apply_memory_plan`` quantises them (engine/quantize.py).
    """
    key = (spec.config_json, spec.family, rank, fused, frozen_quant)
    if key not in _META_UNETS:
        from cat_engine.engine.lora import add_lora, fuse_lora

        family = dit_family(spec.family)
        if family is None:
            from diffusers import UNet2DConditionModel

            with torch.device("meta"):
                unet = add_lora(UNet2DConditionModel.from_config(spec.config), rank=rank)
        else:
            with torch.device("meta"):
                unet = add_lora(build_transformer(spec), rank=rank, targets=family.default_targets)
        unet = fuse_lora(unet) if fused else unet
        quantize_frozen(unet, frozen_quant)
        _META_UNETS[key] = unet
    return _META_UNETS[key]


# --- meta-device measurement -------------------------------------------------------------------


def _step_inputs(spec: ModelSpec, resolution: int, batch: int, device) -> CatBatch:
    side = resolution // spec.vae_scale_factor
    family = dit_family(spec.family)
    if family is not None:  # the family's conditioning, its text length (the pipeline's maximum)
        return family.example_batch(spec.config, batch, side, spec.text_tokens, device=device)
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
    ``plan.frozen_quant`` is the model's to have (:func:`_meta_lora_unet`); ``plan.offload`` is
    installed for the step (engine/offload.py): the blocks' copies in flight are then counted.
    """
    from cat_engine.engine.lora import lora_parameters
    from cat_engine.engine.offload import BlockOffload

    half = DTYPES[plan.precision] if plan.precision in ("bf16", "fp16") else None
    unet.train()
    # xformers saves the same tensors as flash SDPA (q, k, v, out, lse); model it as sdpa.
    set_attention(unet, "math" if plan.attention == "math" else "sdpa")
    if plan.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    cast_frozen_weights(unet, half or torch.float32)
    offload = BlockOffload(unet, device) if plan.offload else None
    known = storage_keys(list(unet.parameters()) + list(unet.buffers()))
    tracker = LiveBytes(known)
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
            MetaCuda(emulated, device_type, flash_sdpa=is_meta),
            # meta tensors have no autocast: the fused LoRA op must see the emulated one
            emulated_autocast("meta", emulated),
            real_autocast,
            assume_nonzero_all() if is_meta else nullcontext(),
        ):
            inputs = _step_inputs(spec, resolution, batch, device)
            out = loss_fn(unet, inputs)  # kept whole through backward, as a training loop keeps it
            del inputs
            at_backward = tracker.current
            run_backward(out[0])
            del out
    finally:
        for p in lora_parameters(unet):
            p.grad = None
        if offload is not None:
            offload.remove()
    return at_backward, tracker.peak


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
    key = (spec.config_json, spec.family, resolution, batch, plan.precision, plan.gradient_checkpointing,
           plan.attention == "math", plan.frozen_quant, plan.offload, rank, _loss_key(loss_fn))  # fmt: skip
    if key in _MEASURED:
        return _MEASURED[key]
    failures = []
    # The split-batch path saves about what the three-call reference saves (docs/design.md §4),
    # so the reference is a close stand-in when only the split-batch code fails on meta.
    for fused, method in ((True, "meta"), (False, "meta, three-call reference")):
        try:
            at_backward, peak = measure_step(
                _meta_lora_unet(spec, rank, fused, plan.frozen_quant), spec, resolution, batch, plan, loss_fn
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
    unet = _meta_lora_unet(spec, rank, True, plan.frozen_quant)
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
    if spec.family is not None:  # a transformer: any whole number of patches; 8 a side
        return spec.pixel_multiple * 8
    # the smallest latent side every down-sampling level divides evenly, times 2
    levels = len(spec.config.get("block_out_channels", (0, 0, 0, 0)))
    return spec.vae_scale_factor * 2 ** (levels - 1) * 2


# --- public API --------------------------------------------------------------------------------


def _param_bytes(unet, plan: MemoryPlan) -> tuple[int, int, int]:
    """``(weights on the device, LoRA weights, frozen weights offloaded to CPU memory)`` in bytes."""
    from cat_engine.engine.offload import offload_blocks

    frozen_size = 2 if plan.precision in ("bf16", "fp16") else 4
    away = set()
    if plan.offload:
        away = {
            id(t)
            for b in offload_blocks(unet)
            for t in (*b.parameters(), *b.buffers())
            if not t.requires_grad
        }
    # cast_frozen_weights keeps normalisation layers' weights in fp32
    norms = {id(p) for m in unet.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    weights = lora = offloaded = 0
    for name, p in unet.named_parameters():
        if is_lora_name(name):
            lora += rounded(p.numel() * 4)
            continue
        if is_quantized(p):  # its values and scales, one allocation each
            size = sum(rounded(tensor_bytes(leaf)) for leaf in plain_tensors(p))
        else:
            size = rounded(p.numel() * (4 if id(p) in norms else frozen_size))
        if id(p) in away:
            offloaded += size
        else:
            weights += size
    for b in unet.buffers():
        size = rounded(b.numel() * frozen_size)
        if id(b) in away:
            offloaded += size
        else:
            weights += size
    return weights, lora, offloaded


def _optimizer_bytes(unet, optimizer: str) -> int:
    from cat_engine.engine.optimizers import state_bytes

    return sum(
        rounded(b)
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
        model: a name of ``unet_configs.MODEL_NAMES`` (``sd15``, ``sdxl``, ``flux``, ``sd35-large``,
            ``zimage``, ...), ``builtin-tiny-<family>``, a UNet config dict, or a diffusers folder.
        resolution: image side in pixels (latents are ``resolution / vae_scale_factor``).
        batch: images per step (the loss adds rows of its own, such as CAT's plain-caption and base rows).
        plan: the memory plan (precision ``auto`` is taken as bf16, the CUDA default); with
            ``frozen_quant`` the quantised weights' bytes are counted, with ``offload`` the blocks'
            frozen weights are not (they are in ``offloaded``), their copies in flight are.
        rank: LoRA rank (default targets: the model family's).
        loss_fn: the training step's loss, ``loss_fn(unet, batch: CatBatch)`` (:data:`StepLoss`),
            e.g. ``cat_engine.cat.loss.step_loss(cat_weight)``.
        optimizer: ``adamw``, ``adamw8bit`` or ``prodigy`` (``engine/optimizers.py``), whose state is counted.
    """
    spec = resolve_model(model)
    if resolution % spec.pixel_multiple:
        raise ValueError(f"resolution must be a multiple of {spec.pixel_multiple}, got {resolution}")
    if plan.precision == "auto":
        plan = replace(plan, precision="bf16")
    at_backward, peak, method = _measure_cached(spec, resolution, batch, plan, rank, loss_fn)
    unet = _meta_lora_unet(spec, rank, True, plan.frozen_quant)
    weights, lora, offloaded = _param_bytes(unet, plan)
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
        offloaded=offloaded,
    )


def candidate_plans(
    half: str = "bf16", attention: str = "sdpa", family: str | None = None
) -> list[MemoryPlan]:
    """Plans in order of expected speed, fastest first; ``family``: a diffusion transformer's.

    UNets: half precision before fp32: bf16/fp16 matmuls run at twice the TF32 tensor-core rate or
    more and move half the bytes. Without checkpointing before with: checkpointing recomputes each
    checkpointed block's forward in backward, which costs less than falling back to fp32. Hence:
    half, half+ckpt, fp32, fp32+ckpt. ``half`` is ``fp16`` on GPUs without bf16. Math attention is
    never a candidate: slower than SDPA and larger.

    Transformers (docs/design.md §9): half, half+ckpt, then the memory options, all checkpointed:
    block offloading (lossless; its copies overlap the blocks' compute, which at these models'
    token counts takes longer than the copy), an 8-bit frozen base (the frozen model, and so the CAT
    target, moves by the quantisation's error), both. fp32 is no candidate: it doubles the weights,
    which is what limits these models.
    """
    if family is not None:
        ckpt = MemoryPlan(attention=attention, precision=half, gradient_checkpointing=True)
        plans = [
            MemoryPlan(attention=attention, precision=half, gradient_checkpointing=False),
            ckpt,
            replace(ckpt, offload=True),
        ]
        if torchao_problem() is None:  # int8 plans only where they can run (torchao installed)
            plans += [replace(ckpt, frozen_quant="int8"), replace(ckpt, frozen_quant="int8", offload=True)]
        return plans
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
    spec = resolve_model(model)
    return [
        (p, estimate_peak(spec, resolution, batch, p, rank, loss_fn=loss_fn, optimizer=optimizer))
        for p in candidate_plans(half, attention, spec.family)
    ]


def best_plan(model, resolution: int, batch: int, budget_bytes: int, rank: int = 16, *, loss_fn: StepLoss,
              half: str = "bf16", attention: str = "sdpa", reserve: int = CUDA_CONTEXT_RESERVE,
              optimizer: str = "adamw"):  # fmt: skip
    """The fastest candidate plan whose estimate plus ``reserve`` (CUDA context) fits ``budget_bytes``.

    Returns ``(MemoryPlan, VramEstimate)``; raises :class:`NoPlanFits` naming the smallest plan's
    need when none fits. ``half="fp16"`` on GPUs without bf16.
    """
    spec = resolve_model(model)
    candidates = []
    for plan in candidate_plans(half, attention, spec.family):  # lazily: stop at the first that fits
        est = estimate_peak(spec, resolution, batch, plan, rank, loss_fn=loss_fn, optimizer=optimizer)
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
