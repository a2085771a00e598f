"""The CAT objective on diffusion transformers: flow matching (docs/design.md §1, §9).

    x_t = (1 - sigma) x_0 + sigma noise,   v = noise - x_0
    L     = L_FM + lambda * L_CAT
    L_FM  = mse( v_ada(x_t, t, y_T), v )
    L_CAT = mse( v_ada(x_t, t, y),   sg(v_base(x_t, t, y)) )

The same ``x_t``, ``t`` (``1000 * sigma``) and noise for the three row groups, as for the UNets. The
conditioning is generic: each caption's :class:`~cat_engine.engine.text.PromptEmbeds` (text
embeddings, and the pooled text or the text mask its family needs), turned into the transformer's
keyword arguments by the family (``engine/families/``). The maths past the model call is the UNets'
(:mod:`cat_engine.cat.loss`): one split-batch call, mean squared errors in float32.
"""

from __future__ import annotations

import functools

import torch

from cat_engine.cat.loss import CatLossOutput, batch_loss, batch_loss_reference
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.families import denoiser_family
from cat_engine.engine.text import PromptEmbeds


def flow_cat_loss(
    transformer,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    token: PromptEmbeds,
    plain: PromptEmbeds,
    target: torch.Tensor,
    *,
    cat_weight: float = 1.0,
    reference: bool = False,
) -> CatLossOutput:
    """The CAT loss of one flow-matching batch: one split-batch call (docs/design.md §4).

    Args:
        transformer: an SD3, Flux or Z-Image transformer carrying a LoRA adapter, fused
            (``cat_engine.engine.fuse_lora``) for the split batch; unfused, the reference runs.
        noisy_latents: ``x_t``, ``[B, C, h, w]`` (unpacked, also for Flux).
        timesteps: ``1000 * sigma``, ``[B]``.
        token: the captions with the trigger token, as ``engine.text.encode_prompts`` encodes them.
        plain: the same captions without it.
        target: ``noise - x_0``, shaped like ``noisy_latents``.
        cat_weight: ``lambda``; 0 gives plain LoRA training.
        reference: run the three-call reference instead (:data:`flow_cat_loss_reference`).

    Equals :data:`flow_cat_loss_reference` (tests/cat/test_flow_loss.py); call ``loss.backward()``.
    """
    family = denoiser_family(transformer)
    if family is None:
        raise ValueError(
            f"flow_cat_loss: {type(transformer).__name__} is not a transformer family of the engine"
        )
    batch = CatBatch(
        noisy_latents,
        timesteps,
        token.embeds,
        plain.embeds,
        target,
        family.conditioning(token),
        family.conditioning(plain),
    )
    if reference:
        return batch_loss_reference(transformer, batch, cat_weight)
    return batch_loss(transformer, batch, cat_weight)


# Three transformer calls: adapter/token, adapter/plain, base/plain under no_grad.
flow_cat_loss_reference = functools.partial(flow_cat_loss, reference=True)
