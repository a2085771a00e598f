"""Min-SNR weighting of the LDM term (``--min-snr-gamma``), the CAT term left as it is.

Min-SNR (Hang et al. 2023) weighs each sample's denoising loss by ``min(SNR(t), gamma) / SNR(t)``
(epsilon prediction; ``/ (SNR(t) + 1)`` for v-prediction, no division when the model predicts
the sample), so that the low-noise timesteps, whose noise targets pull the shared weights in
conflicting directions, do not dominate. The CAT term is not weighted: its target is the frozen
model's own prediction at the same ``z_t`` and ``t``, not a noisy regression target, and the
adapter must match it at every timestep a sampler visits; weighting it would loosen preservation
exactly at the low-noise steps that draw an image's details, and change what ``lambda`` means.

    L = mean_i( w(t_i) * ldm_i ) + lambda * mean_i( cat_i )

:func:`row_losses` gives the per-row, differentiable LDM and CAT terms of the split-batch step
(the same UNet call as ``cat.loss.batch_loss``); :func:`min_snr_step_loss` is the engine's step
loss built on it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cat_engine.cat.loss import step_loss
from cat_engine.engine.batch import CatBatch, StepLoss
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import adapters_disabled
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.split_unet import row_unaware_layers, split_batch_call


def min_snr_weights(noise_scheduler, gamma: float) -> tuple[float, ...]:
    """The min-SNR weight of every training timestep ``t`` (index ``t``), as diffusers' scripts compute it."""
    from diffusers.training_utils import compute_snr

    t = torch.arange(noise_scheduler.config.num_train_timesteps)
    snr = compute_snr(noise_scheduler, t)
    weights = torch.clamp(snr, max=gamma)
    prediction = noise_scheduler.config.prediction_type
    if prediction == "epsilon":
        weights = weights / snr
    elif prediction == "v_prediction":
        weights = weights / (snr + 1)
    return tuple(weights.tolist())


def row_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each row, ``[B]``, in float32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


def row_losses(unet, batch: CatBatch, with_cat: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The differentiable per-row LDM term ``[B]`` and CAT term ``[B]`` (``None`` without CAT).

    One split-batch UNet call (token rows, plain rows | base rows), as ``cat.loss.batch_loss``
    makes it; a UNet whose LoRA layers ignore the adapter rows takes the three-call reference.
    """
    z, t, b = batch.noisy_latents, batch.timesteps, batch.rows
    token, plain = batch.added_cond_kwargs, batch.plain_conditioning
    if not with_cat:
        with adapter_rows(unet, None):
            return row_mse(unet_forward(unet, z, t, batch.token_embeds, token), batch.target), None
    if row_unaware_layers(unet):
        ldm = row_mse(unet_forward(unet, z, t, batch.token_embeds, token), batch.target)
        pred_plain = unet_forward(unet, z, t, batch.plain_embeds, plain)
        with torch.no_grad(), adapters_disabled(unet):
            pred_base = unet_forward(unet, z, t, batch.plain_embeds, plain)
        return ldm, row_mse(pred_plain, pred_base)
    embeds = torch.cat([batch.token_embeds, batch.plain_embeds, batch.plain_embeds])
    added = None if token is None else {k: torch.cat([token[k], plain[k], plain[k]]) for k in token}
    pred = split_batch_call(unet, z, t, embeds, 2 * b, added)
    return row_mse(pred[:b], batch.target), row_mse(pred[b : 2 * b], pred[2 * b :].detach())


def min_snr_step_loss(cat_weight: float, weights: tuple[float, ...]) -> StepLoss:
    """The step loss with the LDM term weighted per row by ``weights[t]`` (:func:`min_snr_weights`).

    Returns ``(loss, ldm, cat)`` as ``cat.loss.step_loss`` does; ``ldm`` is the weighted term. A
    ``functools.partial`` of hashable arguments, so the VRAM estimator caches it like the plain one.
    """
    return functools.partial(_weighted_tuple, cat_weight=cat_weight, weights=weights)


def _weighted_tuple(unet, batch: CatBatch, cat_weight: float, weights: tuple[float, ...]):
    ldm_rows, cat_rows = row_losses(unet, batch, with_cat=cat_weight != 0)
    w = torch.tensor(weights, device=ldm_rows.device)[batch.timesteps.to(ldm_rows.device)]
    ldm = (w * ldm_rows).mean()
    cat = cat_rows.mean() if cat_rows is not None else torch.zeros((), device=ldm.device)
    loss = ldm + cat_weight * cat if cat_rows is not None else ldm
    return loss, ldm.detach(), cat.detach()


def training_loss(cat_weight: float, min_snr_gamma: float | None, noise_scheduler) -> StepLoss:
    """The step loss of a run: ``cat.loss.step_loss``, or the min-SNR one with ``--min-snr-gamma``."""
    if min_snr_gamma is None:
        return step_loss(cat_weight)
    return min_snr_step_loss(cat_weight, min_snr_weights(noise_scheduler, min_snr_gamma))
