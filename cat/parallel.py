"""Data-parallel CAT for code that embeds the engine: ``cat_loss`` with the LoRA gradients synchronised.

The split batch needs the bare UNet (its split state, its modules, its checkpoint function), so the
UNet itself must not be wrapped in DDP or FSDP (``cat_loss`` refuses a wrapped one). What gets
wrapped instead is :class:`CatLoss`: a module whose forward is ``cat_loss`` on the UNet it holds and
whose parameters are the adapter's tensors only (the engine's ``TrainStep``, docs/design.md §3). DDP
then broadcasts the adapter from rank 0 at start-up and averages its gradients in ``backward``;
the frozen weights never go over the wire.

    loss_fn = data_parallel_cat_loss(unet)         # DDP when torch.distributed runs several ranks
    out = loss_fn(noisy_latents, timesteps, token_embeds, plain_embeds, target, reduction="none")
    (out.loss * weights).mean().backward()         # gradients averaged over the ranks

With accelerate: ``loss_fn = accelerator.prepare(CatLoss(unet))`` (examples/accelerate_cat.py).
"""

from __future__ import annotations

import torch

from cat_engine.cat.loss import CatLossOutput, batch_loss, cat_batch, step_loss
from cat_engine.engine import distributed as dist
from cat_engine.engine.row_aware import check_bare_model


class CatLoss(dist.TrainStep):
    """``cat_loss`` as a module: ``forward`` takes :func:`~cat_engine.cat.cat_loss`'s arguments (all
    but the UNet) and returns its :class:`~cat_engine.cat.loss.CatLossOutput`.

    ``params``: the tensors to synchronise, default every trainable parameter of ``unet`` (the
    adapter's, once the rest is frozen). They are registered here as the very ``Parameter`` objects
    of the UNet, so the gradients DDP averages are the ones the optimizer steps.
    """

    def __init__(self, unet: torch.nn.Module, params=None):
        check_bare_model(unet, "CatLoss")
        params = [p for p in unet.parameters() if p.requires_grad] if params is None else list(params)
        if not params:
            raise ValueError("CatLoss: the UNet has no trainable parameters; add a LoRA adapter first")
        super().__init__(unet, params, step_loss())

    def forward(
        self, *args, cat_weight: float = 1.0, reduction: str = "mean", **conditioning
    ) -> CatLossOutput:
        """``cat_loss(unet, *args, cat_weight=..., reduction=..., **conditioning)``."""
        return batch_loss(self.model, cat_batch(*args, **conditioning), cat_weight, reduction)


def data_parallel_cat_loss(unet: torch.nn.Module, params=None, device: torch.device | None = None):
    """:class:`CatLoss` of ``unet``, wrapped in DDP when this process belongs to an initialised
    ``torch.distributed`` group of several ranks (torchrun's, accelerate's, your own); else itself.

    ``device``: where the UNet runs (default: its parameters' device); on CUDA, DDP's device.
    """
    step = CatLoss(unet, params)
    if device is None:
        device = next(iter(step.parameters())).device
    return dist.data_parallel(step, dist.current_context(), device)
