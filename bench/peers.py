"""The peers the engine is measured against (docs/design.md §7), written the way trainers write them.

Both run on a diffusers UNet carrying a peft LoRA adapter (``unet.add_adapter(LoraConfig(...))``),
set up as diffusers' LoRA training scripts do it (:func:`prepare_peer`, :func:`peer_optimizer`), and
are deliberately independent of ``cat_engine.cat``: they are what the engine must beat.

- :func:`peft_lora_loss`: plain LoRA, one UNet call on the token captions.
- :func:`naive_cat_loss`: CAT as "output preservation" features of other trainers do it, three
  UNet calls: adapter/token captions, adapter/plain captions, and the base model
  (``disable_adapters()``) on the plain captions under ``no_grad``.
- :func:`base_forward`: one no-grad forward of the frozen base model, the unit CAT's overhead is
  measured in.

``batch`` is a :class:`cat_engine.engine.batch.CatBatch`; losses are float32 scalars.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import add_lora, lora_named_parameters
from cat_engine.engine.memory_plan import MemoryPlan, enable_checkpointing, set_attention


def prepare_peer(unet, like, plan: MemoryPlan, checkpoint_func=None):
    """Give ``unet`` (frozen weights already in the plan's dtype) a peft LoRA adapter equal to
    ``like``'s, in float32, and the plan's attention, checkpointing and compile; return it.

    As diffusers' LoRA scripts: ``add_adapter`` on the cast UNet, trainable weights back to fp32,
    ``enable_gradient_checkpointing()``, ``unet.compile()`` with no gradient check.
    """
    reference = lora_named_parameters(like)
    config = like.peft_config["default"]
    add_lora(unet, rank=config.r, alpha=config.lora_alpha, targets=sorted(config.target_modules))
    with torch.no_grad():
        for name, p in lora_named_parameters(unet).items():
            p.data = reference[name].detach().float().clone()
    set_attention(unet, plan.attention)
    if plan.gradient_checkpointing:
        enable_checkpointing(unet, checkpoint_func)
    if plan.compile:
        unet.compile(mode=None if plan.compile == "default" else plan.compile)
    return unet


def peer_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` with its defaults, as the training scripts build it."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=1e-2)


def predict(unet, batch, embeds: torch.Tensor, added_cond_kwargs: dict | None) -> torch.Tensor:
    """``eps(z_t, t, embeds)`` of every row."""
    return unet_forward(unet, batch.noisy_latents, batch.timesteps, embeds, added_cond_kwargs)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


def plain_added(batch) -> dict | None:
    """SDXL's added conditioning of the plain captions (the token captions' where the batch has one)."""
    if batch.plain_added_cond_kwargs is not None:
        return batch.plain_added_cond_kwargs
    return batch.added_cond_kwargs


def peft_lora_loss(unet, batch) -> torch.Tensor:
    return mse(predict(unet, batch, batch.token_embeds, batch.added_cond_kwargs), batch.target)


def naive_cat_loss(unet, batch, cat_weight: float = 1.0) -> torch.Tensor:
    ldm = mse(predict(unet, batch, batch.token_embeds, batch.added_cond_kwargs), batch.target)
    pred_plain = predict(unet, batch, batch.plain_embeds, plain_added(batch))
    with torch.no_grad():
        pred_base = base_forward(unet, batch)
    return ldm + cat_weight * mse(pred_plain, pred_base)


def base_forward(unet, batch) -> torch.Tensor:
    """The frozen model on the plain captions, adapters off (call under ``torch.no_grad``)."""
    unet.disable_adapters()
    try:
        return predict(unet, batch, batch.plain_embeds, plain_added(batch))
    finally:
        unet.enable_adapters()
