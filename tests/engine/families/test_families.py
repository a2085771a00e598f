"""The transformer families: detection, loading, prompt encoding as each pipeline does it, the split
batch's units, and LoRA targets the split batch cannot serve."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch

from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.builtin_dit import tiny_transformer
from cat_engine.engine.families import DIT_FAMILIES, denoiser_family, family_of_index, lora_prefix
from cat_engine.engine.families.base import UnsupportedTargets
from cat_engine.engine.families.flux import pack, unpack
from cat_engine.engine.lora import add_lora, default_targets, fuse_lora
from cat_engine.engine.models import ModelLoadError, load_base, model_family, resolve_base
from cat_engine.engine.text import encode_prompts

FAMILIES = list(DIT_FAMILIES)
PROMPTS = ["a photo of sks star on the beach", "a photo of star", ""]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    """(family name, the loaded tiny folder, the family's diffusers pipeline on the same folder)."""
    name = request.param
    model = load_base(f"builtin-tiny-{name}")
    pipe_cls = getattr(diffusers, DIT_FAMILIES[name].pipeline_class)
    pipe = pipe_cls.from_pretrained(str(model.path), local_files_only=True)
    return name, model, pipe


def test_a_folder_is_told_by_its_transformer(tiny):
    name, model, _ = tiny
    assert model.family == name and model_family(model.path) == name
    assert denoiser_family(model.unet) is DIT_FAMILIES[name] and lora_prefix(model.unet) == "transformer"
    assert resolve_base(f"builtin-tiny-{name}") == model.path
    assert model.native_resolution == 64 and model.vae_scale_factor == 4 and model.prediction_type == "flow"
    assert default_targets(model.unet) == DIT_FAMILIES[name].default_targets


def test_unet_folders_keep_their_families():
    assert (
        family_of_index({"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder_2": [None, None]})
        == "sd"
    )
    sdxl = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    assert family_of_index(sdxl) == "sdxl"
    assert model_family(builtin_model_dir()) == "sd"


def test_an_unknown_transformer_is_a_one_line_error(tmp_path):
    index = {"_class_name": "QwenImagePipeline", "transformer": ["diffusers", "QwenImageTransformer2DModel"]}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="QwenImageTransformer2DModel.*SD3Transformer2DModel"):
        load_base(tmp_path)


def test_a_component_from_elsewhere_is_refused(tmp_path):
    folder = builtin_model_dir("flux", pretrained=False)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["somewhere_else", "Scheduler"]
    for item in folder.iterdir():
        if item.is_dir():
            (tmp_path / item.name).symlink_to(item)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="somewhere_else"):
        load_base(tmp_path)


def test_loading_without_encoders_keeps_the_geometry():
    model = load_base("builtin-tiny-flux", load_encoders=False)
    assert model.vae is None and not model.text_encoders and not model.tokenizers
    assert model.native_resolution == 64 and model.vae_scale_factor == 4


def test_prompts_are_encoded_as_the_pipeline_encodes_them(tiny):
    name, model, pipe = tiny
    got = encode_prompts(model, PROMPTS)
    length = model.tokenizers[-1].model_max_length
    if name == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False, max_sequence_length=length
        )
        torch.testing.assert_close(got.embeds, embeds)
        torch.testing.assert_close(got.pooled, pooled)
    elif name == "flux":
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=length)
        torch.testing.assert_close(got.embeds, embeds)
        torch.testing.assert_close(got.pooled, pooled)
    else:
        embeds, _ = pipe.encode_prompt(
            list(PROMPTS), do_classifier_free_guidance=False, max_sequence_length=length
        )
        assert got.mask.shape == got.embeds.shape[:2]
        assert len({len(e) for e in embeds}) > 1  # the prompts' lengths differ: the mask matters
        for row, want in zip(range(len(PROMPTS)), embeds):
            torch.testing.assert_close(got.embeds[row][got.mask[row]], want)
        # Encoded in chunks, the rows are padded alike and the unused columns dropped.
        chunked = DIT_FAMILIES[name].encode_prompts(model, PROMPTS, batch_size=1)
        torch.testing.assert_close(chunked.embeds, got.embeds)
        assert torch.equal(chunked.mask, got.mask) and got.mask.any(dim=0).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_block_classes_are_what_diffusers_checkpoints(name):
    model = tiny_transformer(name).eval()
    seen = set()

    def record(module, *args):
        seen.add(type(module).__name__)
        return module(*args)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=record)
    batch = DIT_FAMILIES[name].example_batch(
        model.config, 1, 8, 4, generator=torch.Generator().manual_seed(0)
    )
    from cat_engine.engine.denoiser import unet_forward

    z = batch.noisy_latents.requires_grad_()
    unet_forward(model, z, batch.timesteps, batch.token_embeds, batch.added_cond_kwargs)
    assert seen == set(DIT_FAMILIES[name].block_classes)


def test_lora_on_flattened_tokens_is_refused():
    model = tiny_transformer("zimage").eval()
    add_lora(model, rank=4, targets=["to_q", "all_x_embedder.2-1"], seed=0)
    with pytest.raises(UnsupportedTargets, match="all_x_embedder"):
        fuse_lora(model)


def test_flux_packing_round_trip():
    z = torch.randn(2, 16, 8, 6)
    packed = pack(z)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(unpack(packed, 8, 6), z)


@pytest.mark.parametrize("name", FAMILIES)
def test_example_batch_shapes_on_meta(name):
    model = tiny_transformer(name)
    batch = DIT_FAMILIES[name].example_batch(model.config, 2, 32, device="meta")
    assert batch.noisy_latents.device.type == "meta" and batch.noisy_latents.shape[-1] == 32
    assert batch.token_embeds.shape[0] == 2
    assert batch.token_embeds.shape[1] >= DIT_FAMILIES[name].max_sequence_length
