"""Flow-matching training batches (cat/data.py): x_t, t and the target from the family's recipe, all
randomness from the loop's generator, a rank's rows equal to the global batch's."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from cat_engine.cat.data import CachedData, compile_check_inputs, draw_batch
from cat_engine.engine.builtin_dit import SCHEDULERS
from cat_engine.engine.cache import CaptionCache, LatentCache
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.text import PromptEmbeds

N = 4


def _data(name: str) -> CachedData:
    g = torch.Generator().manual_seed(0)
    latents = LatentCache(torch.randn(N, 16, 8, 8, generator=g), torch.rand(N, 16, 8, 8, generator=g) * 0.1)
    embeds = PromptEmbeds(torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g))
    if name == "zimage":
        embeds = PromptEmbeds(embeds.embeds, None, torch.tensor([[True] * 5, [True] * 4 + [False]]))
    texts = CaptionCache(
        embeds, ["tok", "plain"], torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)
    )
    return CachedData(latents, texts, ["tok"] * N, [0] * N, name, ["plain"] * N)


@pytest.mark.parametrize("name", list(DIT_FAMILIES))
def test_flow_batch_follows_the_family_recipe(name):
    family, data = DIT_FAMILIES[name], _data(name)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name])
    indices = [2, 0, 3]
    batch = draw_batch(data, indices, torch.Generator().manual_seed(5), scheduler)

    g = torch.Generator().manual_seed(5)  # the same draws, in the same order
    idx = torch.tensor(indices)
    mean, std = data.latents.mean[idx], data.latents.std[idx]
    x0 = mean + std * torch.randn(mean.shape, generator=g)
    noise = torch.randn(mean.shape, generator=g)
    sigma = family.training_sigmas(scheduler.config, len(idx), g, mean.shape)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy_latents, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(batch.target, noise - x0)
    torch.testing.assert_close(batch.timesteps, sigma * 1000)
    assert torch.equal(batch.token_embeds, data.texts.embeds.embeds[[0, 0, 0]])
    assert torch.equal(batch.plain_embeds, data.texts.embeds.embeds[[1, 1, 1]])
    key = "text_mask" if name == "zimage" else "pooled_projections"
    assert set(batch.added_cond_kwargs) == set(batch.plain_added_cond_kwargs) == {key}
    assert not torch.equal(batch.added_cond_kwargs[key], batch.plain_added_cond_kwargs[key])


def test_a_ranks_rows_are_the_global_batchs():
    data, scheduler = _data("flux"), FlowMatchEulerDiscreteScheduler(**SCHEDULERS["flux"])
    whole = draw_batch(data, [0, 1, 2, 3], torch.Generator().manual_seed(1), scheduler)
    part = draw_batch(data, [0, 1, 2, 3], torch.Generator().manual_seed(1), scheduler, rows=slice(2, 4))
    for field in ("noisy_latents", "timesteps", "target", "token_embeds"):
        assert torch.equal(getattr(part, field), getattr(whole, field)[2:4]), field


def test_compile_check_inputs_carry_the_familys_conditioning():
    batch = compile_check_inputs(_data("sd3"))
    assert batch.rows == 1 and batch.timesteps.tolist() == [500.0]
    assert set(batch.added_cond_kwargs) == {"pooled_projections"}
