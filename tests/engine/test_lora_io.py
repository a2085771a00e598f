"""The saved LoRA files (diffusers and kohya format) load and give the same UNet outputs as the trained one."""

import json

import pytest
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


def _trained(base_dir, family, alpha, targets):
    """A fused UNet of ``base_dir`` with a random rank-4 adapter, its added conditioning and outputs."""
    unet = load_base(base_dir, load_encoders=False).unet
    add_lora(unet, rank=4, alpha=alpha, targets=targets, seed=0)
    _randomise_lora(unet)
    fuse_lora(unet)
    added = None
    if family == "sdxl":
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return unet, added, _outputs(unet, added)


def _roundtrip(tmp_path, family, pipeline_cls, alpha, targets=("to_q", "to_k", "to_v", "to_out.0")):
    unet, added, expected = _trained(builtin_model_dir(family), family, alpha, targets)
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
    unet = load_base(load_encoders=False).unet
    with pytest.raises(ValueError, match="carries no LoRA adapter"):
        fuse_lora(unet)


# --------------------------------------------------------------------------------------------------
# The kohya file (engine/kohya.py), checked against the loaders' published key rules.
#
# The rules, as read in the loaders' sources (and re-derived here, independently of engine/kohya.py):
#
# * ComfyUI, comfy/lora.py ``model_lora_keys_unet``: for every weight ``diffusion_model.K.weight`` of
#   the original (LDM) UNet, the LoRA module ``lora_unet_`` + K with "." -> "_" patches it; and for
#   every diffusers weight name D that comfy/utils.py ``unet_to_diffusers`` maps to an LDM weight,
#   ``lora_unet_`` + D with "." -> "_" patches the same weight. ``unet_to_diffusers`` walks the
#   blocks: down block x, layer i is ``input_blocks.(1 + (L+1)x + i)`` (``.0`` its resnet, ``.1`` its
#   attention), the middle block is ``middle_block.0/.1/.2`` (resnet, attention, resnet), up block x,
#   layer i (of L+1) is ``output_blocks.((L+1)x + i)``; inside an attention the names are the same
#   in both forms (``proj_in``, ``transformer_blocks.t.attn1.to_q``, ``ff.net.2``...); resnet names
#   change (``conv1`` -> ``in_layers.2``, ``time_emb_proj`` -> ``emb_layers.1``, ``conv2`` ->
#   ``out_layers.3``, ``conv_shortcut`` -> ``skip_connection``). comfy/lora.py ``load_lora`` then
#   reads ``<name>.lora_up.weight``, ``<name>.lora_down.weight`` and ``<name>.alpha`` (scale
#   alpha / rank; no alpha: scale 1) and warns about every key it did not use.
# * kohya sd-scripts, networks/lora.py ``create_modules``: the module name is ``lora_unet`` + "." +
#   the module's path in the UNet it trains, with "." -> "_". For SD1.x/2.x that UNet has diffusers'
#   layout (so: the diffusers path); for SDXL it is the original one (so: the LDM path,
#   ``input_blocks...``); its ``LoRAModule`` stores ``alpha`` as a buffer next to ``lora_down`` /
#   ``lora_up``, and scales by alpha / lora_dim.
# * AUTOMATIC1111, extensions-builtin/Lora/networks.py: SD1.x/2.x names go through
#   ``convert_diffusers_name_to_compvis`` (``lora_unet_down_blocks_(b)_attentions_(i)_X`` ->
#   ``diffusion_model_input_blocks_(1 + 3b + i)_1_X``, up blocks ``output_blocks_(3b + i)_1``, mid
#   ``middle_block_1``: the real models' two layers per block); SDXL names have ``lora_unet``
#   replaced by ``diffusion_model`` and must then be the model's own LDM names.
# --------------------------------------------------------------------------------------------------

TRANSFORMER_LINEARS = [
    f"{a}.{m}" for a in ("attn1", "attn2") for m in ("to_q", "to_k", "to_v", "to_out.0")
] + ["ff.net.0.proj", "ff.net.2"]
RESNET_RENAMES = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def comfy_style_module_map(config) -> dict[str, str]:
    """diffusers module path -> LDM module path, walking the blocks as ComfyUI's unet_to_diffusers does."""
    layers = config.layers_per_block
    depth = config.transformer_layers_per_block
    depth = depth if isinstance(depth, int) else depth[0]
    out = {}

    def attention(diffusers: str, ldm: str):
        for name in ("proj_in", "proj_out"):
            out[f"{diffusers}.{name}"] = f"{ldm}.{name}"
        for t in range(depth):
            for name in TRANSFORMER_LINEARS:
                out[f"{diffusers}.transformer_blocks.{t}.{name}"] = f"{ldm}.transformer_blocks.{t}.{name}"

    def resnet(diffusers: str, ldm: str):
        for d, o in RESNET_RENAMES.items():
            out[f"{diffusers}.{d}"] = f"{ldm}.{o}"

    for x, kind in enumerate(config.down_block_types):
        n = 1 + (layers + 1) * x
        for i in range(layers):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n}.0")
            if "CrossAttn" in kind:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1")
            n += 1
    attention("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.0", "middle_block.0")
    resnet("mid_block.resnets.1", "middle_block.2")
    for x, kind in enumerate(config.up_block_types):
        n = (layers + 1) * x
        for i in range(layers + 1):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            if "CrossAttn" in kind:
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1")
            n += 1
    return out


def comfy_key_map(unet) -> dict[str, str]:
    """ComfyUI's LoRA module name -> diffusers module path, both forms, for the modules that exist."""
    modules = dict(unet.named_modules())
    key_map = {}
    for diffusers, ldm in comfy_style_module_map(unet.config).items():
        if diffusers in modules:
            key_map["lora_unet_" + ldm.replace(".", "_")] = diffusers
            key_map["lora_unet_" + diffusers.replace(".", "_")] = diffusers
    return key_map


def a1111_sd_module_name(name: str) -> str | None:
    """AUTOMATIC1111's SD1.x/2.x conversion of a diffusers-form name (attention modules only)."""
    import re

    m = re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if m:
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    m = re.match(r"lora_unet_mid_block_attentions_(\d+)_(.+)", name)
    if m:
        return f"diffusion_model_middle_block_1_{m[2]}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", name)
    if m:
        return f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[2])}_1_{m[3]}"
    return None


def adapted_modules(unet) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def check_kohya_keys(unet, state: dict, family: str) -> None:
    """Every tensor of the file patches a LoRA module of the UNet by the rules above; none missing."""
    key_map = comfy_key_map(unet)
    adapted = adapted_modules(unet)
    seen = {}
    for key in state:
        name, _, suffix = key.partition(".")
        assert suffix in ("lora_down.weight", "lora_up.weight", "alpha"), key
        assert name in key_map, f"{name}: ComfyUI's key map does not know it"
        seen.setdefault(name, set()).add(suffix)
    for name, suffixes in seen.items():
        assert suffixes == {"lora_down.weight", "lora_up.weight", "alpha"}, (name, suffixes)
        module = adapted[key_map[name]]  # KeyError: the name maps to a module without the adapter
        assert state[f"{name}.lora_down.weight"].shape == module.lora_A["default"].weight.shape
        assert state[f"{name}.lora_up.weight"].shape == module.lora_B["default"].weight.shape
        assert state[f"{name}.alpha"].shape == ()
        assert ("input_blocks" in name or "output_blocks" in name or "middle_block" in name) == (
            family == "sdxl"
        )
    covered = sorted(key_map[name] for name in seen)
    assert covered == sorted(adapted), "every adapted module exactly once"


def _kohya_unet(family, alpha, targets=("to_q", "to_k", "to_v", "to_out.0"), **overrides):
    from cat_engine.engine.builtin import tiny_unet

    torch.manual_seed(0)
    unet = tiny_unet(family, **overrides)
    add_lora(unet, rank=4, alpha=alpha, targets=targets, seed=0)
    _randomise_lora(unet)
    return fuse_lora(unet)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("layers", [1, 2])
def test_kohya_keys_follow_the_loaders_rules(family, layers):
    from cat_engine.engine.kohya import kohya_state_dict

    targets = (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "ff.net.0.proj",
        "ff.net.2",
        "proj_in",
        "proj_out",
        "time_emb_proj",
    )
    unet = _kohya_unet(family, alpha=8, targets=targets, layers_per_block=layers)
    state = kohya_state_dict(unet)
    check_kohya_keys(unet, state, family)
    assert {v.item() for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    if family == "sd" and layers == 2:  # the real SD models' layout, which AUTOMATIC1111's table assumes
        ldm = {f"lora_unet_{v.replace('.', '_')}": k for k, v in comfy_style_module_map(unet.config).items()}
        for name in {k.partition(".")[0] for k in state}:
            converted = a1111_sd_module_name(name)
            if converted is not None:
                assert (
                    ldm["lora_unet_" + converted.removeprefix("diffusion_model_")]
                    == comfy_key_map(unet)[name]
                )


def test_kohya_alpha_is_each_modules_own():
    """Per-module alphas (peft's alpha_pattern) and rsLoRA's scaling both come out as alpha / r."""
    from peft import LoraConfig

    from cat_engine.engine.builtin import tiny_unet
    from cat_engine.engine.kohya import kohya_state_dict

    unet = tiny_unet("sd").requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], alpha_pattern={"to_v": 2.0})
    )
    state = kohya_state_dict(unet)
    for key, value in state.items():
        if key.endswith(".alpha"):
            assert value.item() == (2.0 if key.endswith("to_v.alpha") else 8.0), key
    rs = tiny_unet("sd").requires_grad_(False)
    rs.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q"], use_rslora=True))
    alphas = {v.item() for k, v in kohya_state_dict(rs).items() if k.endswith(".alpha")}
    assert alphas == {8 / 2 * 4}  # scaling 8 / sqrt(4), times r


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    from cat_engine.engine.lora import save_lora_files

    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    base_dir = builtin_model_dir(family, pretrained=False)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
    unet, added, expected = _trained(base_dir, family, 8, targets)  # alpha != rank: the scale is 2
    out = tmp_path / "my-dog"
    info = {"token": "sks", "class_word": "dog", "resolution": 64, "base": str(base_dir), "steps": 3}
    diffusers_file, kohya_file = save_lora_files(unet, out, "both", info)
    assert diffusers_file.name == LORA_WEIGHT_NAME and kohya_file.name == "my-dog.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted([LORA_WEIGHT_NAME, "my-dog.safetensors"])

    outputs = {}
    for file in (diffusers_file, kohya_file):
        pipe = pipeline_cls.from_pretrained(base_dir, local_files_only=True)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        outputs[file.name] = _outputs(pipe.unet, added)
    base = _outputs(pipeline_cls.from_pretrained(base_dir, local_files_only=True).unet, added)
    assert not torch.allclose(base, expected, atol=1e-3)
    torch.testing.assert_close(outputs[kohya_file.name], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[kohya_file.name], outputs[diffusers_file.name], rtol=1e-5, atol=1e-5)

    with safe_open(str(kohya_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if family == "sdxl" else "sd_v1")
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_output_name"] == "my-dog"
    assert (
        meta["modelspec.trigger_phrase"] == "sks" and "sks" in json.loads(meta["ss_tag_frequency"])["sks dog"]
    )
    assert read_lora_metadata(kohya_file)["class_word"] == "dog"


def test_save_format_kohya_alone_and_a_bad_format(tmp_path):
    from cat_engine.engine.lora import save_lora_files

    unet = _kohya_unet("sd", alpha=4)
    paths = save_lora_files(unet, tmp_path / "run", "kohya", {"token": "sks", "class_word": "dog"})
    assert [p.name for p in paths] == ["run.safetensors"] == [p.name for p in (tmp_path / "run").iterdir()]
    with pytest.raises(ValueError, match="save format must be one of diffusers, kohya, both"):
        save_lora_files(unet, tmp_path, "ckpt")


def test_an_adapter_the_kohya_format_cannot_name_is_refused_in_one_line():
    from cat_engine.engine.kohya import KohyaFormatError, kohya_module_names

    unet = _kohya_unet("sdxl", alpha=4, layers_per_block=(1, 2))  # no LDM block numbering for that
    with pytest.raises(KohyaFormatError, match="different layers per block") as exc:
        kohya_module_names(unet)
    assert "\n" not in str(exc.value)


def test_zimage_gets_the_diffusers_file_alone_and_kohya_is_refused(tmp_path):
    from cat_engine.engine.builtin_dit import tiny_transformer
    from cat_engine.engine.kohya import KohyaFormatError
    from cat_engine.engine.lora import save_lora_files

    model = tiny_transformer("zimage")
    add_lora(model, rank=4, targets=("attention.to_q",), seed=0)
    paths = save_lora_files(model, tmp_path / "dit", "both", {"token": "sks"})
    assert [p.name for p in paths] == [LORA_WEIGHT_NAME] == [p.name for p in (tmp_path / "dit").iterdir()]
    with pytest.raises(KohyaFormatError, match="not a ZImageTransformer2DModel; use --save-format diffusers"):
        save_lora_files(model, tmp_path / "dit", "kohya")
