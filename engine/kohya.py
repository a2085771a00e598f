"""LoRA files in the kohya format: what ComfyUI, AUTOMATIC1111/Forge and kohya's sd-scripts load
(docs/design.md §11).

Those tools do not read peft's ``lora_A``/``lora_B`` keys (diffusers does). They read, per module::

    lora_unet_<module path, "." -> "_">.lora_down.weight   [r, in] (peft's lora_A)
    lora_unet_<module path, "." -> "_">.lora_up.weight     [out, r] (peft's lora_B)
    lora_unet_<module path, "." -> "_">.alpha              scalar; the delta is scaled by alpha / r

and a missing ``.alpha`` means scale 1, so every module carries its own: ``scaling * r``, which is
peft's ``lora_alpha`` (also per-module alphas, and rsLoRA's ``alpha / sqrt(r)`` scaling, come out
right).

Module paths (the rules the loaders apply, written out in tests/engine/test_lora_io.py):

* SD1.x/SD2.x: the diffusers path (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``),
  as sd-scripts names these LoRAs (it trains them on a UNet laid out like diffusers'). ComfyUI maps
  each diffusers weight name to the original (LDM) one and accepts ``lora_unet_`` + the diffusers name;
  AUTOMATIC1111 converts the same names with its own pattern table.
* SDXL: the original (LDM/"sgm") path (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``), as
  sd-scripts names SDXL LoRAs (it trains SDXL on the original UNet). ComfyUI and AUTOMATIC1111 match
  these against the model's own weight names; diffusers maps them back with the UNet config.

* SD3/3.5 and Flux.1 transformers: ``lora_transformer_`` + the diffusers path
  (``lora_transformer_transformer_blocks_0_attn_to_q``), OneTrainer's names, which ComfyUI (and
  Forge, which shares its LoRA loader) map onto the model's own weights, fused q/k/v slices
  included. Z-Image has no such names in those loaders: its diffusers file (``transformer.*`` keys)
  is what they read, so the kohya format is refused for it.

diffusers path -> LDM path, with ``L`` the layers per block (every block the same):

    down_blocks.i.resnets.j.X       input_blocks.(1 + i(L+1) + j).0.X'
    down_blocks.i.attentions.j.X    input_blocks.(1 + i(L+1) + j).1.X
    down_blocks.i.downsamplers.0.conv  input_blocks.((i+1)(L+1)).0.op
    mid_block.resnets.j.X           middle_block.(2j).X'
    mid_block.attentions.0.X        middle_block.1.X
    up_blocks.i.resnets.j.X         output_blocks.(i(L+1) + j).0.X'
    up_blocks.i.attentions.j.X      output_blocks.(i(L+1) + j).1.X
    up_blocks.i.upsamplers.0.conv   output_blocks.(i(L+1) + L).(2 if the block has attentions, else 1).conv
    conv_in / conv_norm_out / conv_out           input_blocks.0.0 / out.0 / out.2
    time_embedding.linear_1|2 / add_embedding.linear_1|2   time_embed.0|2 / label_emb.0.0|0.2

where ``X`` is kept as is inside attention blocks and resnet names become ``X'``:
``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`` ->
``in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import write_atomically

PREFIX = "lora_unet_"
TRANSFORMER_PREFIX = "lora_transformer_"
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# sd-scripts' names of the base model families (ss_base_model_version) and SAI model-spec architectures.
MODEL_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sd3": "sd3", "flux": "flux1"}
ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sd3": "stable-diffusion-v3-medium",
    "flux": "flux-1-dev",
}
# The transformer classes the format names, by their family here.
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


class KohyaFormatError(CatEngineError):
    """An adapter that the kohya format cannot express; the message says which module and why."""


def unet_family(config) -> str:
    """``sdxl`` (added text/time conditioning), ``sd2`` (1024-wide OpenCLIP text) or ``sd1``."""
    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if config.get("cross_attention_dim") == 1024 else "sd1"


def kohya_family(model) -> str:
    """The key of :data:`MODEL_VERSIONS` of ``model``: ``sd3``/``flux`` or the UNet's family."""
    return TRANSFORMER_FAMILIES.get(type(model).__name__) or unet_family(model.config)


def _layers_per_block(config) -> int:
    layers = config.get("layers_per_block")
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise KohyaFormatError(
                f"kohya format: a UNet with different layers per block ({list(layers)}) has no LDM names"
            )
        layers = layers[0]
    return int(layers)


def ldm_path(path: str, config) -> str | None:
    """The original (LDM) module path of a diffusers UNet module path; ``None`` when it has none."""
    if path in TOP_LEVEL:
        return TOP_LEVEL[path]
    per = _layers_per_block(config) + 1  # LDM blocks per diffusers block
    parts = path.split(".")

    def inner(kind: str, rest: list[str]) -> str | None:
        if kind == "attentions":
            return ".".join(rest) or None
        if kind == "resnets" and rest and rest[0] in RESNET_NAMES:
            return ".".join([RESNET_NAMES[rest[0]], *rest[1:]])
        return None

    if (
        parts[0] in ("down_blocks", "up_blocks")
        and len(parts) >= 5
        and parts[1].isdigit()
        and parts[3].isdigit()
    ):
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        down = parts[0] == "down_blocks"
        if kind in ("downsamplers", "upsamplers"):
            if rest != ["conv"] or j != 0:
                return None
            if down:
                return f"input_blocks.{(i + 1) * per}.0.op"
            types = config.get("up_block_types") or ()
            slot = 2 if i < len(types) and "CrossAttn" in types[i] else 1
            return f"output_blocks.{i * per + per - 1}.{slot}.conv"
        tail = inner(kind, rest)
        if tail is None:
            return None
        block = 1 + i * per + j if down else i * per + j
        slot = 1 if kind == "attentions" else 0
        return f"{'input_blocks' if down else 'output_blocks'}.{block}.{slot}.{tail}"
    if parts[0] == "mid_block" and len(parts) >= 4 and parts[2].isdigit():
        kind, j = parts[1], int(parts[2])
        tail = inner(kind, parts[3:])
        if tail is None:
            return None
        return f"middle_block.1.{tail}" if kind == "attentions" else f"middle_block.{2 * j}.{tail}"
    return None


def kohya_module_name(path: str, config, family: str | None = None) -> str:
    """``lora_unet_...`` of the UNet module at diffusers path ``path``, ``lora_transformer_...`` of
    an SD3/Flux transformer's (``family`` from :func:`kohya_family`; see the module docstring)."""
    family = family or unet_family(config)
    if family in TRANSFORMER_FAMILIES.values():
        return TRANSFORMER_PREFIX + path.replace(".", "_")
    if family == "sdxl":
        ldm = ldm_path(path, config)
        if ldm is None:
            raise KohyaFormatError(
                f"kohya format: module {path} has no SDXL (LDM) name; save with --save-format diffusers"
            )
        path = ldm
    return PREFIX + path.replace(".", "_")


def kohya_supported(model) -> bool:
    """The format as written here covers diffusers' ``UNet2DConditionModel`` (SD1.x/2.x/SDXL) and
    the SD3 and Flux.1 transformers."""
    from diffusers import UNet2DConditionModel

    return isinstance(model, UNet2DConditionModel) or type(model).__name__ in TRANSFORMER_FAMILIES


def _adapter_layers(unet) -> list[tuple[str, object, str]]:
    """``(path, peft LoRA layer, adapter name)`` of every module carrying the adapter."""
    from peft.tuners.lora.layer import LoraLayer

    if not kohya_supported(unet):
        raise KohyaFormatError(
            f"--save-format kohya: written for SD1.x/2.x/SDXL UNets and SD3/Flux transformers, not a "
            f"{type(unet).__name__}; use --save-format diffusers (ComfyUI reads its transformer.* keys)"
        )

    out = []
    for path, module in unet.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        names = [n for n in module.active_adapters if n in module.lora_A]
        if len(names) != 1:
            raise KohyaFormatError(f"kohya format: {path} has {len(names)} active adapters; one is needed")
        name = names[0]
        if getattr(module, "use_dora", {}).get(name, False):
            raise KohyaFormatError(f"kohya format: {path} is a DoRA layer; save with --save-format diffusers")
        out.append((path, module, name))
    return out


def kohya_module_names(unet) -> dict[str, str]:
    """``{diffusers path: kohya module name}`` of every module carrying the adapter; raises
    :class:`KohyaFormatError` for one the format cannot name."""
    family = kohya_family(unet)
    return {path: kohya_module_name(path, unet.config, family) for path, _, _ in _adapter_layers(unet)}


def kohya_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter of ``unet`` (peft LoRA, fused or not) under kohya keys, float32 on the CPU."""
    state, family = {}, kohya_family(unet)
    for path, layer, name in _adapter_layers(unet):
        key = kohya_module_name(path, unet.config, family)
        down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
        rank = down.shape[0]
        state[f"{key}.lora_down.weight"] = down.detach().to("cpu", torch.float32).contiguous()
        state[f"{key}.lora_up.weight"] = up.detach().to("cpu", torch.float32).contiguous()
        # The loaders scale by alpha / rank: the alpha that reproduces this layer's own scaling.
        state[f"{key}.alpha"] = torch.tensor(float(layer.scaling[name]) * rank, dtype=torch.float32)
    if not state:
        raise KohyaFormatError("kohya format: the UNet carries no LoRA adapter")
    return state


def _layer_tensors(key: str, layer, name: str) -> dict[str, torch.Tensor]:
    """One peft LoRA layer's down, up and alpha tensors under kohya module name ``key``."""
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    return {
        f"{key}.lora_down.weight": down.detach().to("cpu", torch.float32).contiguous(),
        f"{key}.lora_up.weight": up.detach().to("cpu", torch.float32).contiguous(),
        f"{key}.alpha": torch.tensor(float(layer.scaling[name]) * down.shape[0], dtype=torch.float32),
    }


# sd-scripts' prefixes of the text encoders' LoRA: SD1.x/2.x's one encoder, SDXL's two.
TEXT_ENCODER_PREFIXES = {1: ("lora_te_",), 2: ("lora_te1_", "lora_te2_")}


def kohya_text_encoder_state_dict(encoders) -> dict[str, torch.Tensor]:
    """The peft LoRA of CLIP text ``encoders`` (one: SD1.x/2.x, two: SDXL) under sd-scripts' keys:
    the encoder's prefix + the module path from ``text_model``, ``.`` -> ``_``."""
    from peft.tuners.lora.layer import LoraLayer

    from cat_engine.engine.text import clip_module_path

    state = {}
    for prefix, encoder in zip(TEXT_ENCODER_PREFIXES[len(encoders)], encoders):
        for path, layer in encoder.named_modules():
            if isinstance(layer, LoraLayer):
                key = prefix + clip_module_path(path).replace(".", "_")
                state.update(_layer_tensors(key, layer, next(iter(layer.lora_A))))
    return state


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def kohya_metadata(unet, name: str, info: dict) -> dict[str, str]:
    """sd-scripts' ``ss_*`` keys and the SAI model-spec keys those tools display, from ``info``.

    ``info``: the engine's record of the run (``token``, ``class_word``, ``concepts``, ``base``,
    ``resolution``, ``steps``, ``prediction_type``, ``images``, ...); what it lacks is left out.
    """
    family = kohya_family(unet)
    layers = _adapter_layers(unet)
    ranks = sorted({layer.r[n] for _, layer, n in layers})
    alphas = sorted({float(layer.scaling[n]) * layer.r[n] for _, layer, n in layers})
    concepts = info.get("concepts") or [{"token": info.get("token"), "class_word": info.get("class_word")}]
    images = info.get("images")
    tags = {
        f"{c['token']} {c['class_word']}": {c["token"]: images or 1, c["class_word"]: images or 1}
        for c in concepts
        if c.get("token")
    }
    resolution = info.get("resolution")
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else json.dumps(alphas),
        "ss_base_model_version": MODEL_VERSIONS[family],
        "ss_v2": str(family == "sd2"),
        "ss_output_name": name,
        "ss_tag_frequency": json.dumps(tags),
        "ss_training_comment": "Contrastive Adapter Training (cat-engine): trigger "
        + ", ".join(f"'{c['token']}' ({c['class_word']})" for c in concepts if c.get("token")),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURES[family]}/lora",
        "modelspec.implementation": {
            "sdxl": "https://github.com/Stability-AI/generative-models",
            "flux": "https://github.com/black-forest-labs/flux",
        }.get(family, "diffusers"),
        "modelspec.title": name,
        "modelspec.trigger_phrase": ", ".join(c["token"] for c in concepts if c.get("token")),
    }
    optional = {
        "ss_sd_model_name": Path(str(info["base"])).name if info.get("base") else None,
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else None,
        "ss_steps": info.get("steps"),
        "ss_max_train_steps": info.get("steps"),
        "ss_num_train_images": images,
        "ss_learning_rate": info.get("lr"),
        "ss_seed": info.get("seed"),
        "modelspec.prediction_type": info.get("prediction_type"),
    }
    meta.update({k: _text(v) for k, v in optional.items() if v is not None})
    return meta


def kohya_file_name(output_dir: str | os.PathLike) -> str:
    """``<name>.safetensors``: the output folder's name, kept to characters every tool accepts."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(output_dir).resolve().name).strip("._") or "cat-lora"
    return f"{stem}.safetensors"


def save_kohya(
    unet,
    output_dir: str | os.PathLike,
    info: dict | None = None,
    *,
    name: str | None = None,
    extra_metadata: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``OUTPUT/<name>.safetensors`` atomically; return its path.

    ``name``: the file name (default :func:`kohya_file_name` of ``output_dir``); ``extra_metadata``:
    further string entries (the engine's own record, under its key); ``extra_tensors``: other
    modules' LoRA under kohya keys (:func:`kohya_text_encoder_state_dict`).
    """
    from safetensors.torch import save_file

    path = Path(output_dir) / (name or kohya_file_name(output_dir))
    state = {**kohya_state_dict(unet), **(extra_tensors or {})}
    metadata = {
        "format": "pt",
        **kohya_metadata(unet, path.stem, info or {}),
        **(extra_metadata or {}),
    }
    return write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
