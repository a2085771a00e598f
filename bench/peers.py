"""The peers the engine is measured against (docs/design.md §7), written the way trainers write them.

Both run on a diffusers UNet carrying a peft LoRA adapter (``unet.add_adapter(LoraConfig(...))``)
and are deliberately independent of ``cat_engine.cat``: they are what the engine must beat.

- :func:`peft_lora_loss`: plain LoRA, one UNet call on the token captions.
- :func:`naive_cat_loss`: CAT as "output preservation" features of other trainers do it, three
  UNet calls: adapter/token captions, adapter/plain captions, and the base model
  (``disable_adapters()``) on the plain captions under ``no_grad``.
- :func:`base_forward`: one no-grad forward of the frozen base model, the unit CAT's overhead is
  measured in.

``batch`` is a :class:`cat_engine.bench.presets.Batch`; losses are float32 scalars.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def predict(unet, batch, embeds: torch.Tensor) -> torch.Tensor:
    """``eps(z_t, t, embeds)`` of every row; SDXL's added conditioning passes through."""
    kwargs = {} if batch.added_cond_kwargs is None else {"added_cond_kwargs": batch.added_cond_kwargs}
    return unet(
        batch.noisy_latents, batch.timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs
    )[0]


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def peft_lora_loss(unet, batch) -> torch.Tensor:
    return mse(predict(unet, batch, batch.token_embeds), batch.target)


def naive_cat_loss(unet, batch, cat_weight: float = 1.0) -> torch.Tensor:
    ldm = mse(predict(unet, batch, batch.token_embeds), batch.target)
    pred_plain = predict(unet, batch, batch.plain_embeds)
    with torch.no_grad():
        pred_base = base_forward(unet, batch)
    return ldm + cat_weight * mse(pred_plain, pred_base)


def base_forward(unet, batch) -> torch.Tensor:
    """The frozen model on the plain captions, adapters off (call under ``torch.no_grad``)."""
    unet.disable_adapters()
    try:
        return predict(unet, batch, batch.plain_embeds)
    finally:
        unet.enable_adapters()
