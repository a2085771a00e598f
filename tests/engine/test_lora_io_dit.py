"""A transformer's LoRA file, written by the engine, loads with the family's diffusers pipeline
(``load_lora_weights``) and gives the same outputs (SD3, Flux, Z-Image)."""

from __future__ import annotations

import diffusers
import pytest
import torch

from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import (
    LORA_WEIGHT_NAME,
    adapters_disabled,
    add_lora,
    fuse_lora,
    read_lora_metadata,
    save_lora,
)
from cat_engine.engine.models import load_base


@pytest.mark.parametrize("name", list(DIT_FAMILIES))
def test_roundtrip_through_the_pipeline(tmp_path, name):
    family = DIT_FAMILIES[name]
    model = load_base(f"builtin-tiny-{name}", load_encoders=False)
    transformer = model.unet
    add_lora(transformer, rank=4, alpha=8, targets=family.default_targets, seed=0)
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    fuse_lora(transformer)
    save_lora(transformer, tmp_path / "lora", {"token": "sks"})
    assert read_lora_metadata(tmp_path / "lora")["token"] == "sks"

    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(str(model.path), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)

    batch = family.example_batch(transformer.config, 2, 16, 5, generator=torch.Generator().manual_seed(0))
    args = (batch.noisy_latents, batch.timesteps, batch.token_embeds, batch.added_cond_kwargs)
    with torch.no_grad():
        want = unet_forward(transformer, *args)
        got = unet_forward(pipe.transformer, *args)
        with adapters_disabled(transformer):
            base = unet_forward(transformer, *args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base).abs().max() > 1e-3  # the adapter shows: the comparison means something
