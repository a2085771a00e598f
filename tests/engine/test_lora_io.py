"""The saved LoRA loads in diffusers and gives the same UNet outputs as the trained one."""

import torch

from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.lora import (
    LORA_WEIGHT_NAME,
    add_lora,
    fuse_lora,
    lora_parameters,
    read_lora_metadata,
    save_lora,
)
from cat_engine.engine.models import load_base


def _randomise_lora(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _outputs(unet, added=None):
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 16, 16, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {"added_cond_kwargs": added} if added else {}
    with torch.no_grad():
        return unet(lat, torch.tensor([10, 500]), encoder_hidden_states=emb, **kwargs).sample


def _roundtrip(tmp_path, family, pipeline_cls, alpha, targets=("to_q", "to_k", "to_v", "to_out.0")):
    unet = load_base(builtin_model_dir(family), load_encoders=False).unet
    add_lora(unet, rank=4, alpha=alpha, targets=targets, seed=0)
    _randomise_lora(unet)
    fuse_lora(unet)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    expected = _outputs(unet, added)
    save_lora(unet, tmp_path, {"token": "sks", "class_word": "star"})
    assert (tmp_path / LORA_WEIGHT_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]  # no temporary file left

    pipe = pipeline_cls.from_pretrained(builtin_model_dir(family), local_files_only=True)
    base = _outputs(pipe.unet, added)
    pipe.load_lora_weights(tmp_path)
    loaded = _outputs(pipe.unet, added)
    assert not torch.allclose(base, expected, atol=1e-3), (
        "the LoRA must change the outputs for this test to mean anything"
    )
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
    meta = read_lora_metadata(tmp_path)
    assert meta["r"] == 4 and meta["lora_alpha"] == float(alpha) and meta["token"] == "sks"


def test_sd_lora_roundtrip_through_load_lora_weights(tmp_path):
    from diffusers import StableDiffusionPipeline

    _roundtrip(tmp_path, "sd", StableDiffusionPipeline, alpha=8)  # alpha != rank: metadata must carry it


def test_roundtrip_with_feed_forward_and_projection_targets(tmp_path):
    """Mixed targets once lost the attention weights on load (two key forms in one file)."""
    from diffusers import StableDiffusionPipeline

    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    _roundtrip(tmp_path, "sd", StableDiffusionPipeline, alpha=4, targets=targets)


def test_sdxl_lora_roundtrip_through_load_lora_weights(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    _roundtrip(tmp_path, "sdxl", StableDiffusionXLPipeline, alpha=4)


def test_fuse_lora_without_adapter_is_a_clear_error():
    import pytest

    unet = load_base(load_encoders=False).unet
    with pytest.raises(ValueError, match="carries no LoRA adapter"):
        fuse_lora(unet)
