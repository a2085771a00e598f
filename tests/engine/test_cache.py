"""Latent and caption caching on the built-in tiny model, plus the latent arithmetic on a stub VAE."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cat_engine.cat.dataset import builtin_concept_dir, load_concept_images
from cat_engine.engine import cache
from cat_engine.engine.cache import encode_captions, encode_latents
from cat_engine.engine.models import load_base
from cat_engine.engine.text import encode_prompts


@pytest.fixture(scope="module")
def model():
    # The random tiny model: its VAE has SD's scaling factor (0.18215); the toy world's is fitted.
    from cat_engine.engine.builtin import builtin_model_dir

    return load_base(builtin_model_dir(pretrained=False))


@pytest.fixture(scope="module")
def concept():
    return load_concept_images(builtin_concept_dir(), resolution=64)


class StubVAE(torch.nn.Module):
    """Encodes to a fixed mean/std, so the scale and shift arithmetic can be checked exactly."""

    def __init__(self, mean: float, std: float, scaling_factor: float, shift_factor=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(scaling_factor=scaling_factor, shift_factor=shift_factor)
        self.values = (mean, std)

    def encode(self, x):
        shape = (x.shape[0], 4, x.shape[2] // 8, x.shape[3] // 8)
        mean = torch.full(shape, self.values[0], dtype=x.dtype)
        std = torch.full(shape, self.values[1], dtype=x.dtype)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std))


# --- latents ----------------------------------------------------------------------------------


def test_latents_are_the_scaled_vae_distribution(model, concept):
    latents = encode_latents(model.vae, concept.pixels, batch_size=4)
    assert latents.mean.shape == (6, 4, 16, 16) and latents.std.shape == (6, 4, 16, 16)
    assert latents.mean.dtype == torch.float32 and len(latents) == 6
    scale = model.vae.config.scaling_factor
    assert scale == pytest.approx(0.18215)
    with torch.no_grad():
        dist = model.vae.encode(concept.pixels).latent_dist
    torch.testing.assert_close(latents.mean, dist.mean * scale, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(latents.std, dist.std * scale, rtol=1e-5, atol=1e-6)
    assert (latents.std > 0).all()


def test_batch_size_does_not_change_latents(model, concept):
    one = encode_latents(model.vae, concept.pixels[:3], batch_size=1)
    all_ = encode_latents(model.vae, concept.pixels[:3], batch_size=3)
    torch.testing.assert_close(one.mean, all_.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one.std, all_.std, rtol=1e-5, atol=1e-6)


def test_scale_and_shift_on_stub():
    images = torch.zeros(3, 3, 32, 32)
    latents = encode_latents(StubVAE(mean=2.0, std=0.5, scaling_factor=0.25, shift_factor=1.0), images, 2)
    assert latents.mean.shape == (3, 4, 4, 4)
    assert torch.all(latents.mean == (2.0 - 1.0) * 0.25) and torch.all(latents.std == 0.5 * 0.25)
    unshifted = encode_latents(StubVAE(mean=2.0, std=0.5, scaling_factor=0.25, shift_factor=None), images)
    assert torch.all(unshifted.mean == 0.5)


def test_bad_inputs_raise_value_error(model):
    with pytest.raises(ValueError, match=r"images must be \[N, 3, R, R\], got \[3, 64, 64\]"):
        encode_latents(model.vae, torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="no images"):
        encode_latents(model.vae, torch.zeros(0, 3, 64, 64))
    with pytest.raises(ValueError, match="non-finite latents"):
        encode_latents(StubVAE(mean=float("nan"), std=1.0, scaling_factor=1.0), torch.zeros(1, 3, 16, 16))


# --- captions ---------------------------------------------------------------------------------


def test_captions_are_deduplicated_and_indexed(model, monkeypatch):
    seen = []

    def counting(m, prompts, batch_size=64):
        seen.append(list(prompts))
        return encode_prompts(m, prompts, batch_size=batch_size)

    monkeypatch.setattr(cache, "encode_prompts", counting)
    token = ["a photo of sks star"] * 4 + ["sks star on grass"]
    plain = ["a photo of star"] * 4 + ["star on grass"]
    cached = encode_captions(model, token, plain)
    assert seen == [["a photo of sks star", "sks star on grass", "a photo of star", "star on grass"]]
    assert cached.captions == seen[0]
    assert cached.token_index.tolist() == [0, 0, 0, 0, 1] and cached.plain_index.tolist() == [2, 2, 2, 2, 3]
    assert cached.embeds.embeds.shape == (4, 77, 32) and cached.embeds.pooled is None
    reference = encode_prompts(model, ["sks star on grass", "a photo of star"])
    rows = torch.tensor([4, 0])
    torch.testing.assert_close(cached.token(rows).embeds[0], reference.embeds[0])
    torch.testing.assert_close(cached.plain(rows).embeds[1], reference.embeds[1])
    assert cached.token(slice(0, 2)).embeds.shape == (2, 77, 32)


def test_token_and_plain_share_identical_strings(model):
    cached = encode_captions(model, ["sks star"] * 3, [""] * 3)
    assert cached.captions == ["sks star", ""]
    cached = encode_captions(model, ["star", "sks star"], ["star", "star"])  # e.g. a caption without token
    assert cached.captions == ["star", "sks star"] and cached.plain_index.tolist() == [0, 0]


def test_caption_length_mismatch(model):
    with pytest.raises(ValueError, match="one plain caption per token caption, got 2 and 1"):
        encode_captions(model, ["a", "b"], ["a"])
