"""The one model resolver: every name of the table, folders, config dicts, and unknown names."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from cat_engine.engine.builtin import builtin_model_dir, tiny_unet
from cat_engine.engine.dit_configs import DIT_CONFIGS, TINY_DITS, build_transformer
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.unet_configs import MODEL_NAMES, ModelSpec, resolve_model, spec_from_config

NATIVE = {"tiny": 64, "tiny-xl": 64, "small": 256, "sd15": 512, "sd21": 768, "sdxl": 1024}
NATIVE.update({name: 1024 for name in DIT_CONFIGS} | {name: 64 for name in TINY_DITS})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_name_resolves_to_a_buildable_unet(name):
    spec = resolve_model(name)
    assert spec.name == name
    assert spec.native_resolution % spec.pixel_multiple == 0
    if name in NATIVE:
        assert spec.native_resolution == NATIVE[name]
    if spec.family is not None:  # a diffusion transformer (engine/dit_configs.py)
        model = build_transformer(spec)
        assert type(model).__name__ == DIT_FAMILIES[spec.family].transformer_class
        assert spec.pixel_multiple == 2 * spec.vae_scale_factor
    else:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**spec.config)
        assert unet.config.cross_attention_dim in (spec.text_width, [spec.text_width])
    assert resolve_model(spec) is spec


def test_full_size_configs_have_the_published_sizes():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**resolve_model("sd15").config)
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    sdxl = resolve_model("sdxl")
    assert (sdxl.text_tokens, sdxl.text_width, sdxl.pooled_width) == (77, 2048, 1280)
    assert resolve_model("sd21").text_width == 1024 and resolve_model("sd15").pooled_width is None


def test_tiny_names_are_the_builtin_test_unets():
    for name, family in (("tiny", "sd"), ("tiny-xl", "sdxl")):
        spec = resolve_model(name)
        assert spec.config_json == spec_from_config(name, dict(tiny_unet(family).config)).config_json
        assert spec.vae_scale_factor == 4 and spec.unet_folder is None
    assert resolve_model("tiny-xl").pooled_width == 32


def test_builtin_is_the_shipped_folder():
    spec = resolve_model("builtin")
    assert spec.unet_folder == str(builtin_model_dir() / "unet")
    assert spec.vae_scale_factor == 4


def test_folders_and_dicts(tmp_path):
    """A folder as the trainer reads it; its config's private keys do not change the spec."""
    config = dict(tiny_unet().config)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(config))
    spec = resolve_model(tmp_path)
    assert spec.vae_scale_factor == 8 and spec.unet_folder == str(tmp_path / "unet")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [16, 32, 32]}))
    assert resolve_model(tmp_path).vae_scale_factor == 4
    unet_only = resolve_model(tmp_path / "unet")  # a UNet folder itself
    assert unet_only.unet_folder == str(tmp_path / "unet") and unet_only.config_json == spec.config_json
    from_dict = resolve_model(config)
    assert isinstance(from_dict, ModelSpec) and from_dict.config_json == spec.config_json
    assert spec_from_config("x", config).config_json == spec.config_json


def test_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(CatEngineError, match="unknown model 'nope'.*sd15.*builtin"):
        resolve_model("nope")
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(tmp_path / "missing")
