"""tools/make_random_model.py: full-size configs with the published parameter counts, and folders
the engine loads as it loads a downloaded model."""

import importlib.util
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_random_model.py"
spec = importlib.util.spec_from_file_location("make_random_model", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def _count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", tool.FAMILIES)
def test_full_size_components_have_the_published_parameter_counts(family):
    pipe = tool.random_pipeline(family, "meta")
    unet = {"sd15": 859_520_964, "sdxl": 2_567_463_684}[family]
    assert (_count(pipe.unet), _count(pipe.vae), _count(pipe.text_encoder)) == (unet, 83_653_863, 123_060_480)
    if family == "sdxl":
        assert _count(pipe.text_encoder_2) == 694_659_840


@pytest.mark.parametrize("family", tool.FAMILIES)
def test_a_written_folder_loads_as_a_base_model(monkeypatch, tmp_path, family):
    """Shrunk sizes (the structure is the full one's) so the folder is written in seconds."""
    from cat_engine.engine.models import load_base

    small = {"sd15": dict(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, norm_num_groups=8)}
    small["sdxl"] = dict(
        block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
        cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )  # fmt: skip
    monkeypatch.setitem(tool.UNET_CONFIGS, family, {**tool.UNET_CONFIGS[family], **small[family]})
    monkeypatch.setattr(tool, "VAE", {**tool.VAE, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 8})
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, projection_dim=32
    )
    monkeypatch.setattr(tool, "CLIP_L", {**tool.CLIP_L, **text})
    monkeypatch.setattr(tool, "CLIP_BIG_G", {**tool.CLIP_BIG_G, **text})
    out = tmp_path / family
    assert tool.main([family, str(out), "--device", "cpu", "--dtype", "float16"]) == 0
    model = load_base(out)
    assert model.family == ("sdxl" if family == "sdxl" else "sd")
    assert model.unet.dtype == torch.float32  # loaded as every base is, whatever it was saved in
    assert model.vae_scale_factor == 8 and model.native_resolution == (512 if family == "sd15" else 1024)
    assert len(model.text_encoders) == (2 if family == "sdxl" else 1)
    assert tool.main([family, str(out)]) == 0  # an existing folder is kept
