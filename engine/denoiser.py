"""The one way the engine calls a denoiser and gets its prediction back as a tensor."""

from __future__ import annotations

import torch


def unet_forward(
    unet, latents: torch.Tensor, timesteps, embeds: torch.Tensor, added_cond_kwargs: dict | None = None, **kwargs
) -> torch.Tensor:
    """``unet(latents, timesteps, encoder_hidden_states=embeds, ...)``'s prediction tensor.

    ``added_cond_kwargs`` (SDXL's pooled text and time ids) is passed only when given; other keyword
    arguments of the diffusers UNet (``class_labels``, ``cross_attention_kwargs``, ...) pass through.
    """
    if added_cond_kwargs is not None:
        kwargs["added_cond_kwargs"] = added_cond_kwargs
    return unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]
