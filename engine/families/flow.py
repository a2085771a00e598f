"""Flow matching (docs/design.md §9): the noisy input, the target and the training noise levels.

    x_t = (1 - sigma) * x_0 + sigma * noise        target = noise - x_0 (the velocity)

``sigma`` in [0, 1] is the noise level; the denoiser's timestep is ``1000 * sigma``, as the
schedulers' ``timesteps`` are (each family converts it to what its transformer takes). How sigma is
drawn for training is the family's own recipe, one of:

* :func:`table_sigmas`: ``u`` in [0, 1) indexes the 1000-entry sigma table of the folder's
  ``FlowMatchEulerDiscreteScheduler`` (statically shifted by its ``shift`` when it has no dynamic
  shifting), as diffusers' ``train_dreambooth_lora_{sd3,z_image}`` scripts do; ``u`` uniform
  (Z-Image) or logit-normal (SD3, ``compute_density_for_timestep_sampling("logit_normal")``).
* :func:`resolution_shifted_sigmas`: ``u`` logit-normal, shifted by ``mu`` that grows linearly
  with the image's token count (``calculate_shift`` of the Flux pipeline, the scheduler's exponential
  ``time_shift``): Flux's resolution-dependent shift, as its original training and kohya's
  ``flux_shift`` draw it.

Every draw takes a ``torch.Generator`` (CPU), so training stays resumable and identical on any device.
"""

from __future__ import annotations

import functools
import json
import math

import torch

TRAIN_TIMESTEPS = 1000  # timestep = TRAIN_TIMESTEPS * sigma, the schedulers' convention


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - sigma) x_0 + sigma noise``; ``sigma`` ``[B]`` broadcast over the other dims."""
    s = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1.0 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the denoiser learns: ``noise - x_0``."""
    return noise - x0


def uniform_u(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator)


def logit_normal_u(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """``sigmoid(N(mean, std))``: diffusers' ``compute_density_for_timestep_sampling("logit_normal")``
    drawn from ``generator``."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


@functools.lru_cache(maxsize=8)
def _sigma_table(config_json: str) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(json.loads(config_json)).sigmas.float().clone()


def table_sigmas(scheduler_config, u: torch.Tensor) -> torch.Tensor:
    """``sigmas[int(u * 1000)]`` of the scheduler built from ``scheduler_config`` (its initial table)."""
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    table = _sigma_table(json.dumps(config, sort_keys=True, default=str))
    index = (u * config.get("num_train_timesteps", TRAIN_TIMESTEPS)).long().clamp(0, len(table) - 1)
    return table[index]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` for ``image_seq_len`` tokens: linear through (base_seq_len, base_shift) and
    (max_seq_len, max_shift), as the Flux pipeline computes it."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_mu(scheduler_config, image_seq_len: int) -> float:
    """:func:`calculate_shift` with the shift parameters of a scheduler config (their defaults when absent)."""
    c = dict(scheduler_config)
    return calculate_shift(
        image_seq_len,
        c.get("base_image_seq_len", 256),
        c.get("max_image_seq_len", 4096),
        c.get("base_shift", 0.5),
        c.get("max_shift", 1.15),
    )


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """``e^mu / (e^mu + (1/t - 1))``: the scheduler's exponential time shift (its sigma = 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def resolution_shifted_sigmas(scheduler_config, u: torch.Tensor, image_seq_len: int) -> torch.Tensor:
    """``u`` shifted for an image of ``image_seq_len`` tokens (Flux)."""
    return time_shift(shift_mu(scheduler_config, image_seq_len), u)
