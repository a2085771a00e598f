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
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.split_unet import row_unaware_layers, split_batch_call


@dataclass
class CatLossOutput:
    """``loss`` is differentiable; ``ldm`` and ``cat`` are detached float32 scalars."""

    loss: torch.Tensor
    ldm: torch.Tensor
    cat: torch.Tensor


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements, computed in float32."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _ldm_only(ldm: torch.Tensor) -> CatLossOutput:
    return CatLossOutput(ldm, ldm.detach(), torch.zeros((), device=ldm.device))


def cat_loss_reference(
    unet,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    token_embeds: torch.Tensor,
    plain_embeds: torch.Tensor,
    target: torch.Tensor,
    *,
    cat_weight: float = 1.0,
    added_cond_kwargs: dict | None = None,
    plain_added_cond_kwargs: dict | None = None,
) -> CatLossOutput:
    """Three UNet calls: adapter/token, adapter/plain, base/plain under no_grad."""
    ldm = mse(unet_forward(unet, noisy_latents, timesteps, token_embeds, added_cond_kwargs), target)
    if cat_weight == 0:
        return _ldm_only(ldm)
    plain_cond = plain_added_cond_kwargs if plain_added_cond_kwargs is not None else added_cond_kwargs
    pred_plain = unet_forward(unet, noisy_latents, timesteps, plain_embeds, plain_cond)
    with torch.no_grad(), adapters_disabled(unet):
        pred_base = unet_forward(unet, noisy_latents, timesteps, plain_embeds, plain_cond)
    cat = mse(pred_plain, pred_base.detach())
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
    added_cond_kwargs: dict | None = None,
    plain_added_cond_kwargs: dict | None = None,
) -> CatLossOutput:
    """The CAT loss of one batch (docs/design.md §1).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` carrying a LoRA adapter (peft or fused).
        noisy_latents: ``z_t``, ``[B, C, H, W]``.
        timesteps: ``t``, ``[B]`` (or a scalar).
        token_embeds: text embeddings of the captions with the trigger token, ``[B, L, D]``.
        plain_embeds: text embeddings of the plain captions, ``[B, L, D]``.
        target: the noise, or ``v`` for v-prediction, shaped like ``noisy_latents``.
        cat_weight: ``lambda``; 0 gives plain LoRA training (no CAT passes run).
        added_cond_kwargs: SDXL's ``{"text_embeds", "time_ids"}`` for the token captions.
        plain_added_cond_kwargs: the same for the plain captions (defaults to ``added_cond_kwargs``).

    Returns:
        :class:`CatLossOutput` with ``loss`` (differentiable), ``ldm`` and ``cat`` (detached).

    One UNet call over the split batch ``[token rows, plain rows | base rows]`` (docs/design.md §4,
    ``engine/split_unet.py``): the base rows are the frozen model on the plain captions and never
    enter autograd. Equals :func:`cat_loss_reference` (tests/cat/test_cat_loss.py). Call
    ``loss.backward()`` (not ``torch.autograd.grad``). A UNet whose LoRA layers are not fused runs
    the reference, with a warning. :func:`batch_loss` is the same on a ``CatBatch``.
    """
    batch = CatBatch(
        noisy_latents,
        timesteps,
        token_embeds,
        plain_embeds,
        target,
        added_cond_kwargs,
        plain_added_cond_kwargs,
    )
    return batch_loss(unet, batch, cat_weight)


def batch_loss(unet, batch: CatBatch, cat_weight: float = 1.0) -> CatLossOutput:
    """:func:`cat_loss` of one :class:`~cat_engine.engine.batch.CatBatch`."""
    if cat_weight == 0:
        # Plain LoRA training: one call on the token rows, every row an adapter row.
        with adapter_rows(unet, None):
            pred = unet_forward(
                unet, batch.noisy_latents, batch.timesteps, batch.token_embeds, batch.added_cond_kwargs
            )
        return _ldm_only(mse(pred, batch.target))
    if row_unaware_layers(unet):
        # peft layers that are not fused would put the delta on the base rows: the reference is the
        # only correct path for them (fuse_lora(unet) makes this fast).
        _warn_unfused()
        return cat_loss_reference(unet, **vars(batch), cat_weight=cat_weight)  # fields = its arguments
    b = batch.rows
    token, plain = batch.added_cond_kwargs, batch.plain_conditioning
    # One split batch (docs/design.md §4): token rows, plain rows (adapter), plain rows again (base).
    embeds = torch.cat([batch.token_embeds, batch.plain_embeds, batch.plain_embeds])
    added = None
    if token is not None:
        added = {k: torch.cat([token[k], plain[k], plain[k]]) for k in token}
    pred = split_batch_call(unet, batch.noisy_latents, batch.timesteps, embeds, 2 * b, added)
    ldm = mse(pred[:b], batch.target)
    cat = mse(pred[b : 2 * b], pred[2 * b :].detach())
    return CatLossOutput(ldm + cat_weight * cat, ldm.detach(), cat.detach())


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
