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
    perturb_lora_b,
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
    perturb_lora_b(transformer, 0.1)  # peft starts B at zero: make the delta show
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


# ComfyUI's key map for SD3 and Flux (comfy/lora.py ``model_lora_keys_unet``), re-derived here
# independently of engine/kohya.py: for every weight ``k`` of the model, named as diffusers names
# it, the module key ``"lora_transformer_" + k[:-len(".weight")].replace(".", "_")`` patches ``k``
# (ComfyUI then maps the diffusers name onto its own, fused q/k/v slices included). The patch is
# ``up @ down * alpha / rank`` with the file's ``.alpha`` (scale 1 without one).
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_kohya_file_of_a_transformer_patches_what_comfyui_maps(tmp_path, name, lora_transformer):
    from safetensors.torch import load_file

    from cat_engine.engine.builtin_dit import tiny_transformer
    from cat_engine.engine.lora import save_lora_files

    model = lora_transformer(name)
    for layer in model.modules():  # an alpha that is not the rank, so a missing .alpha would show
        if hasattr(layer, "scaling") and isinstance(layer.scaling, dict):
            layer.scaling = {k: 0.5 for k in layer.scaling}
    diffusers_file, kohya_file = save_lora_files(model, tmp_path / "out", "both", {"token": "sks"})
    state = load_file(str(kohya_file))

    torch.manual_seed(0)
    base = tiny_transformer(name).eval()  # the same weights as the adapted model's base
    weights = dict(base.named_parameters())
    key_map = {
        "lora_transformer_" + k[: -len(".weight")].replace(".", "_"): k
        for k in weights
        if k.endswith(".weight")
    }
    modules = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert modules and modules <= set(key_map), sorted(modules - set(key_map))[:3]
    assert {k.rsplit(".", 1)[0] for k in state if k.endswith(".alpha")} == modules
    with torch.no_grad():
        for module in modules:
            down, up = state[f"{module}.lora_down.weight"], state[f"{module}.lora_up.weight"]
            alpha = state[f"{module}.alpha"].item()
            weights[key_map[module]] += up @ down * (alpha / down.shape[0])

    family = DIT_FAMILIES[name]
    batch = family.example_batch(base.config, 2, 16, 5, generator=torch.Generator().manual_seed(0))
    args = (batch.noisy_latents, batch.timesteps, batch.token_embeds, batch.added_cond_kwargs)
    with torch.no_grad():
        want = unet_forward(model, *args)
        got = unet_forward(base, *args)
        with adapters_disabled(model):
            plain = unet_forward(model, *args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (want - plain).abs().max() > 1e-3  # the adapter shows: the comparison means something
