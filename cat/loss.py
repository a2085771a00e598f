"""The CAT objective (docs/design.md §1).

    L     = L_LDM + lambda * L_CAT
    L_LDM = mse( eps_ada(z_t, t, y_T), target )
    L_CAT = mse( eps_ada(z_t, t, y),   sg(eps_base(z_t, t, y)) )

Both terms use the same ``z_t``, ``t`` and noise; ``mse`` is the mean over all elements in
float32. :func:`cat_loss_reference` is the straightforward three-call form and stays the
reference that faster paths are tested against.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cat_engine.engine.batch import CatBatch, StepLoss
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import adapters_disabled
from cat_engine.engine.row_aware import check_adapter_layers, check_bare_model, verified
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.split_unet import row_unaware_layers, split_batch_call

REDUCTIONS = ("mean", "none")


@dataclass
class CatLossOutput:
    """``loss`` is differentiable; ``ldm`` and ``cat`` are detached float32.

    Scalars with ``reduction="mean"``; per-sample ``[B]`` with ``reduction="none"`` (then
    ``loss = ldm + cat_weight * cat`` row by row, and its mean is the ``"mean"`` loss).
    """

    loss: torch.Tensor
    ldm: torch.Tensor
    cat: torch.Tensor


def mse(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error in float32: over all elements, or per sample (``reduction="none"``: ``[B]``)."""
    err = F.mse_loss(pred.float(), target.float(), reduction="none" if reduction == "none" else "mean")
    return err.flatten(1).mean(1) if reduction == "none" else err


def _ldm_only(ldm: torch.Tensor) -> CatLossOutput:
    return CatLossOutput(ldm, ldm.detach(), torch.zeros_like(ldm.detach()))


def cat_batch(
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    token_embeds: torch.Tensor,
    plain_embeds: torch.Tensor,
    target: torch.Tensor,
    *,
    added_cond_kwargs: dict | None = None,
    plain_added_cond_kwargs: dict | None = None,
    base_embeds: torch.Tensor | None = None,
    base_added_cond_kwargs: dict | None = None,
    plain_unet_kwargs: dict | None = None,
    **unet_kwargs,
) -> CatBatch:
    """:func:`cat_loss`'s inputs as one :class:`~cat_engine.engine.batch.CatBatch`."""
    return CatBatch(
        noisy_latents,
        timesteps,
        token_embeds,
        plain_embeds,
        target,
        added_cond_kwargs,
        plain_added_cond_kwargs,
        base_embeds=base_embeds,
        base_added_cond_kwargs=base_added_cond_kwargs,
        unet_kwargs=unet_kwargs or None,
        plain_unet_kwargs=plain_unet_kwargs,
    )


def cat_loss_reference(
    unet, *args, cat_weight: float = 1.0, reduction: str = "mean", **kwargs
) -> CatLossOutput:
    """Three UNet calls: adapter/token, adapter/plain, base/plain under no_grad. Same arguments as
    :func:`cat_loss`."""
    return batch_loss_reference(unet, cat_batch(*args, **kwargs), cat_weight, reduction)


def batch_loss_reference(
    unet, batch: CatBatch, cat_weight: float = 1.0, reduction: str = "mean"
) -> CatLossOutput:
    """:func:`cat_loss_reference` of one :class:`~cat_engine.engine.batch.CatBatch`."""
    z, t = batch.noisy_latents, batch.timesteps
    token = batch.unet_kwargs or {}
    ldm = mse(
        unet_forward(unet, z, t, batch.token_embeds, batch.added_cond_kwargs, **token),
        batch.target,
        reduction,
    )
    if cat_weight == 0:
        return _ldm_only(ldm)
    plain = batch.plain_kwargs
    pred_plain = unet_forward(unet, z, t, batch.plain_embeds, batch.plain_conditioning, **plain)
    base_embeds, base_added = batch.base_conditioning
    with torch.no_grad(), adapters_disabled(unet):
        pred_base = unet_forward(unet, z, t, base_embeds, base_added, **plain)
    cat = mse(pred_plain, pred_base.detach(), reduction)
    return CatLossOutput(ldm + cat_weight * cat, ldm.detach(), cat.detach())


def cat_loss(
    unet,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    token_embeds: torch.Tensor,
    plain_embeds: torch.Tensor,
    target: torch.Tensor,
    *,
    cat_weight: float = 1.0,
    reduction: str = "mean",
    added_cond_kwargs: dict | None = None,
    plain_added_cond_kwargs: dict | None = None,
    base_embeds: torch.Tensor | None = None,
    base_added_cond_kwargs: dict | None = None,
    plain_unet_kwargs: dict | None = None,
    **unet_kwargs,
) -> CatLossOutput:
    """The CAT loss of one batch (docs/design.md §1).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` carrying a LoRA adapter (peft or fused), not
            wrapped in DDP/FSDP (for data-parallel training see :func:`~cat_engine.cat.data_parallel_cat_loss`).
        noisy_latents: ``z_t``, ``[B, C, H, W]``.
        timesteps: ``t``, ``[B]`` (or a scalar).
        token_embeds: text embeddings of the captions with the trigger token, ``[B, L, D]``.
        plain_embeds: text embeddings of the plain captions, ``[B, L, D]``.
        target: the noise, or ``v`` for v-prediction, shaped like ``noisy_latents``.
        cat_weight: ``lambda``; 0 gives plain LoRA training (no CAT passes run).
        reduction: ``"mean"`` (scalars) or ``"none"`` (per-sample ``[B]`` losses, for min-SNR or
            other loss weights and masks applied by the caller).
        added_cond_kwargs: SDXL's ``{"text_embeds", "time_ids"}`` for the token captions.
        plain_added_cond_kwargs: the same for the plain captions (defaults to ``added_cond_kwargs``).
        base_embeds, base_added_cond_kwargs: the frozen base rows' conditioning when it is not the
            plain rows' (a trained text encoder: the base rows take the frozen encoder's output).
        plain_unet_kwargs: overrides of ``unet_kwargs`` for the plain and base rows (e.g. the plain
            captions' ``encoder_attention_mask``).
        unet_kwargs: any other keyword argument of the UNet (``class_labels``, ``timestep_cond``,
            ``encoder_attention_mask``, ``cross_attention_kwargs``, ...), for every row group; tensors
            whose first dimension is ``B`` are per-row.

    Returns:
        :class:`CatLossOutput` with ``loss`` (differentiable), ``ldm`` and ``cat`` (detached).

    One UNet call over the split batch ``[token rows, plain rows | base rows]`` (docs/design.md §4,
    ``engine/split_unet.py``): the base rows are the frozen model on the plain captions and never
    enter autograd. Equals :func:`cat_loss_reference` (tests/cat/test_cat_loss.py). Call
    ``loss.backward()`` (not ``torch.autograd.grad``). A UNet whose LoRA layers are peft's, not fused,
    runs the reference, with a warning; one whose adapter the engine cannot see (a replaced
    ``forward``, trainable weights outside LoRA layers) is refused (``engine/row_aware.py``).
    :func:`batch_loss` is the same on a ``CatBatch``.
    """
    _warn_if_unsynchronised()
    batch = cat_batch(
        noisy_latents,
        timesteps,
        token_embeds,
        plain_embeds,
        target,
        added_cond_kwargs=added_cond_kwargs,
        plain_added_cond_kwargs=plain_added_cond_kwargs,
        base_embeds=base_embeds,
        base_added_cond_kwargs=base_added_cond_kwargs,
        plain_unet_kwargs=plain_unet_kwargs,
        **unet_kwargs,
    )
    return batch_loss(unet, batch, cat_weight, reduction)


def batch_loss(unet, batch: CatBatch, cat_weight: float = 1.0, reduction: str = "mean") -> CatLossOutput:
    """:func:`cat_loss` of one :class:`~cat_engine.engine.batch.CatBatch`."""
    check_bare_model(unet, "cat_loss")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cat_loss: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if cat_weight == 0:
        # Plain LoRA training: one call on the token rows, every row an adapter row.
        with adapter_rows(unet, None):
            pred = unet_forward(
                unet,
                batch.noisy_latents,
                batch.timesteps,
                batch.token_embeds,
                batch.added_cond_kwargs,
                **(batch.unet_kwargs or {}),
            )
        return _ldm_only(mse(pred, batch.target, reduction))
    check_adapter_layers(unet, "cat_loss")
    if row_unaware_layers(unet):
        # peft layers that are not fused would put the delta on the base rows: the reference is the
        # only correct path for them (fuse_lora(unet) makes this fast).
        _warn_unfused()
        return batch_loss_reference(unet, batch, cat_weight, reduction)
    b = batch.rows
    base_embeds, base_added = batch.base_conditioning
    # One split batch (docs/design.md §4): token rows, plain rows (adapter), base rows.
    embeds = torch.cat([batch.token_embeds, batch.plain_embeds, base_embeds])
    added = None
    if batch.added_cond_kwargs is not None:
        added = _row_groups(
            [batch.added_cond_kwargs, batch.plain_conditioning, base_added], b, "added_cond_kwargs"
        )
    plain = batch.plain_kwargs
    kwargs = _row_groups([batch.unet_kwargs or {}, plain, plain], b, "unet_kwargs")
    with verified(unet):  # checked above
        pred = split_batch_call(unet, batch.noisy_latents, batch.timesteps, embeds, 2 * b, added, **kwargs)
    ldm = mse(pred[:b], batch.target, reduction)
    cat = mse(pred[b : 2 * b], pred[2 * b :].detach(), reduction)
    return CatLossOutput(ldm + cat_weight * cat, ldm.detach(), cat.detach())


def _row_groups(groups: list[dict], rows: int, what: str) -> dict:
    """One keyword dict for the split batch: the row groups' per-row tensors (first dimension
    ``rows``) concatenated in group order; any other value must be the same in every group."""
    out = {}
    for key in groups[0].keys() | groups[1].keys():
        if not all(key in g for g in groups):
            raise ValueError(f"cat_loss: {what}[{key!r}] is given for some row groups only; give it for all")
        values = [g[key] for g in groups]
        first = values[0]
        if isinstance(first, dict):
            out[key] = _row_groups(values, rows, f"{what}[{key!r}]")
        elif torch.is_tensor(first) and first.dim() and first.shape[0] == rows:
            if not all(torch.is_tensor(v) and v.shape == first.shape for v in values):
                raise ValueError(
                    f"cat_loss: {what}[{key!r}] must be a [{rows}, ...] tensor for every row group"
                )
            out[key] = torch.cat(values)
        elif all(v is first for v in values):
            out[key] = first
        else:
            raise ValueError(
                f"cat_loss: {what}[{key!r}] differs between the token and the plain rows but is not a "
                f"per-row tensor (first dimension {rows}); the row groups run in one UNet call"
            )
    return out


def step_loss(cat_weight: float = 1.0) -> StepLoss:
    """:func:`batch_loss` as the engine's :data:`~cat_engine.engine.batch.StepLoss`: ``(loss, ldm, cat)``.

    What the engine's training step and VRAM estimator run: ``TrainStep(unet, params,
    step_loss(w))``, ``best_plan(..., loss_fn=step_loss(w))``. A ``functools.partial``: the
    estimator's cache keys it by its function and arguments, so one weight gives one estimate.
    """
    return functools.partial(_loss_tuple, cat_weight=cat_weight)


def _loss_tuple(unet, batch: CatBatch, cat_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = batch_loss(unet, batch, cat_weight)
    return out.loss, out.ldm, out.cat


_warned_unfused = False


def _warn_unfused():
    global _warned_unfused
    if not _warned_unfused:
        _warned_unfused = True
        warnings.warn(
            "cat_loss: the UNet's LoRA layers are not fused; running the three-call reference. "
            "Call cat_engine.engine.fuse_lora(unet) for the split-batch path.",
            stacklevel=3,
        )


_warned_unsynchronised = False


def _warn_if_unsynchronised():
    """A direct ``cat_loss`` call in a multi-process group trains each rank on its own gradients."""
    global _warned_unsynchronised
    if _warned_unsynchronised or not torch.is_grad_enabled():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _warned_unsynchronised = True
        warnings.warn(
            f"cat_loss called directly in a group of {dist.get_world_size()} processes: nothing synchronises "
            "the LoRA gradients; use cat_engine.cat.data_parallel_cat_loss(unet) (or DDP / accelerator.prepare "
            "around cat_engine.cat.CatLoss(unet)), unless you all-reduce them yourself",
            stacklevel=3,
        )
