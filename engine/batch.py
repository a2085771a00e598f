"""The inputs of one CAT training step, in one type used by the trainer, the bench and the planner.

All three row groups of a CAT step share ``z_t``, ``t`` and the noise (docs/design.md §1); they
differ only in their conditioning: the token captions (adapter rows, LDM term), the plain captions
(adapter rows, CAT term) and the plain captions again for the frozen base rows.

The engine runs a step with the loss function its caller gives it (:data:`StepLoss`): the CAT
maths live in ``cat/``, above the engine (docs/design.md §3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _map(obj, fn):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return fn(obj) if torch.is_tensor(obj) else obj


@dataclass
class CatBatch:
    """One batch of ``B`` training rows.

    ``added_cond_kwargs``: SDXL's ``{"text_embeds": [B, P], "time_ids": [B, 6]}`` for the token
    captions, ``plain_added_cond_kwargs`` the same for the plain captions (``None``: the token
    captions' dict serves both).

    The frozen base rows see the plain captions; ``base_embeds`` / ``base_added_cond_kwargs`` give
    them their own conditioning when it differs from the adapter's plain rows (a trained text
    encoder: the base rows take the frozen encoder's embeddings). ``unet_kwargs``: the UNet's other
    keyword arguments (``class_labels``, ``timestep_cond``, ``cross_attention_kwargs``, ...) for every
    row group; tensors whose first dimension is ``B`` are per-row. ``plain_unet_kwargs`` overrides
    some of them for the plain and base rows (the plain captions' ``encoder_attention_mask``).
    """

    noisy_latents: torch.Tensor  # z_t, [B, C, h, w]
    timesteps: torch.Tensor  # t, [B]
    token_embeds: torch.Tensor  # [B, L, D], captions with the trigger token
    plain_embeds: torch.Tensor  # [B, L, D], the same captions without it
    target: torch.Tensor  # noise (or v), shaped like noisy_latents
    added_cond_kwargs: dict | None = None
    plain_added_cond_kwargs: dict | None = None
    base_embeds: torch.Tensor | None = None  # [B, L, D] for the base rows; None: plain_embeds
    base_added_cond_kwargs: dict | None = None  # None: the plain captions'
    unet_kwargs: dict | None = None
    plain_unet_kwargs: dict | None = None

    @property
    def plain_conditioning(self) -> dict | None:
        """``added_cond_kwargs`` of the plain captions (the token captions' when none is given)."""
        return (
            self.plain_added_cond_kwargs
            if self.plain_added_cond_kwargs is not None
            else self.added_cond_kwargs
        )

    @property
    def base_conditioning(self) -> tuple[torch.Tensor, dict | None]:
        """The base rows' ``(embeds, added_cond_kwargs)``: their own when given, else the plain captions'."""
        embeds = self.base_embeds if self.base_embeds is not None else self.plain_embeds
        added = self.base_added_cond_kwargs
        return embeds, added if added is not None else self.plain_conditioning

    @property
    def plain_kwargs(self) -> dict:
        """The UNet's other keyword arguments for the plain and base rows."""
        return {**(self.unet_kwargs or {}), **(self.plain_unet_kwargs or {})}

    @property
    def rows(self) -> int:
        return int(self.noisy_latents.shape[0])

    def map(self, fn) -> CatBatch:
        """A batch with ``fn`` applied to every tensor (nested dicts included)."""
        return CatBatch(*(_map(getattr(self, f), fn) for f in self.__dataclass_fields__))

    def to(self, device) -> CatBatch:
        return self.map(lambda t: t.to(device))

    def repeated(self, times: int) -> CatBatch:
        """Every tensor repeated ``times`` along dim 0: a plain-LoRA step on ``times * B`` rows."""
        return self.map(lambda t: t.repeat(times, *([1] * (t.dim() - 1))) if t.dim() else t)


# ``loss_fn(model, batch)`` -> a tuple of tensors whose first is the differentiable loss (the others,
# detached, are for logging): how the distributed step and the VRAM estimator run a training step.
StepLoss = Callable[[torch.nn.Module, CatBatch], tuple[torch.Tensor, ...]]
