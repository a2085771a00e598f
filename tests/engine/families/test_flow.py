"""Flow-matching maths and the families' training noise levels against diffusers' own code."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_calculate_shift

from cat_engine.engine.builtin_dit import SCHEDULERS
from cat_engine.engine.families import DIT_FAMILIES, flow


def test_noisy_input_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.flow_noisy(x0, noise, sigma)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    # The velocity carries x_0 to the noise along the straight path: x_t + (1 - sigma) v = noise.
    v = flow.flow_target(x0, noise)
    torch.testing.assert_close(xt[1] + 0.75 * v[1], noise[1])


@pytest.mark.parametrize("family", ["sd3", "zimage"])
def test_table_sigmas_are_the_training_scripts_lookup(family):
    """diffusers' train_dreambooth_lora_{sd3,z_image}: indices = (u * 1000).long(),
    timesteps = scheduler.timesteps[indices], sigmas = scheduler.sigmas at those timesteps."""
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[family])
    u = torch.rand(64, generator=torch.Generator().manual_seed(1))
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    want = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    torch.testing.assert_close(flow.table_sigmas(scheduler.config, u), want)
    torch.testing.assert_close(flow.table_sigmas(scheduler.config, u) * 1000, timesteps)


def test_resolution_shift_is_the_schedulers_time_shift():
    """Flux: mu from the pipeline's calculate_shift, the scheduler's exponential time shift."""
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS["flux"])
    c = scheduler.config
    u = torch.rand(32, generator=torch.Generator().manual_seed(2)).clamp(1e-3, 1 - 1e-3)
    for seq_len in (64, 1024, 4096):
        mu = flux_calculate_shift(
            seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )
        assert math.isclose(DIT_FAMILIES["flux"].mu(c, seq_len), mu)
        torch.testing.assert_close(
            flow.resolution_shifted_sigmas(c, u, seq_len), scheduler.time_shift(mu, 1.0, u)
        )


def test_logit_normal_draws():
    u = flow.logit_normal_u(20000, torch.Generator().manual_seed(3))
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    again = flow.logit_normal_u(20000, torch.Generator().manual_seed(3))
    assert torch.equal(u, again)


def _mean_sigma(family, latent_shape, n=4000):
    config = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[family]).config
    sigma = DIT_FAMILIES[family].training_sigmas(config, n, torch.Generator().manual_seed(4), latent_shape)
    assert sigma.shape == (n,) and ((sigma >= 0) & (sigma <= 1)).all()
    return sigma.mean().item()


def test_family_recipes():
    # SD3 and Z-Image: the table statically shifted by 3 leans towards noise.
    assert _mean_sigma("sd3", (1, 16, 128, 128)) > 0.6
    assert _mean_sigma("zimage", (1, 16, 128, 128)) > 0.6
    # Flux: the larger the image, the noisier its training draws.
    small, large = _mean_sigma("flux", (1, 16, 32, 32)), _mean_sigma("flux", (1, 16, 128, 128))
    assert large > small + 0.05
