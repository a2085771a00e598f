"""The one way the engine calls a denoiser and gets its prediction back as a tensor."""

from __future__ import annotations

import torch

from cat_engine.engine.families import denoiser_family


def unet_forward(
    unet,
    latents: torch.Tensor,
    timesteps,
    embeds: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    **kwargs,
) -> torch.Tensor:
    """``unet(latents, timesteps, encoder_hidden_states=embeds, ...)``'s prediction tensor.

    ``added_cond_kwargs`` (SDXL's pooled text and time ids) is passed only when given; other keyword
    arguments of the diffusers UNet (``class_labels``, ``cross_attention_kwargs``, ...) pass through.

    A diffusion transformer (``engine/families/``) is called the way its family calls it: ``latents``
    ``[N, C, h, w]``, ``timesteps`` ``1000 * sigma``, ``added_cond_kwargs`` its per-row conditioning
    (pooled text, text mask, guidance); the result is the velocity ``noise - x_0``, shaped like
    ``latents``.
    """
    family = denoiser_family(unet)
    if family is not None:
        return family.forward(unet, latents, timesteps, embeds, added_cond_kwargs or {}, **kwargs)
    if added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = added_cond_kwargs
    return unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
