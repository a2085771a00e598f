"""Named UNets and the one resolver of a model name or folder, for the VRAM planner and the bench.

    spec = resolve_model("sdxl")        # or "sd15", "tiny", "builtin", a diffusers folder, a config dict
    spec.config, spec.native_resolution, spec.text_width, spec.pooled_width, spec.unet_folder

Nothing is downloaded: the full-size configurations (SD1.5, SD2.1, SDXL) are written out here and
build on the meta device (shapes, no memory) for FLOP counts and memory estimates; ``tiny``/``tiny-xl`` are the random test UNets of
``engine/builtin.py``, ``small`` a mid-size SD-shaped UNet for CPU profiling, ``builtin`` the toy
world shipped with the engine (a diffusers folder, like any ``--base``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cat_engine.engine.errors import CatEngineError

TEXT_TOKENS = 77  # CLIP's context length: every supported family's text embeddings have 77 rows
SD_VAE_SCALE = 8  # pixels per latent pixel of the SD/SDXL VAEs (four blocks: 2**3)

_SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
# Every named UNet built from a written-out config (with the SD VAE's scale), in the order listed.
UNET_CONFIGS: dict[str, dict] = {
    # SD1.5's layout in three blocks at a fifth of the width: big enough that framework overhead does
    # not dominate a step, small enough for a CPU run.
    "small": {
        **_SD15,
        "sample_size": 32,
        "block_out_channels": (64, 128, 256),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": 32,
    },
    "sd15": _SD15,
    # SD2.x: SD1.5's layout with an OpenCLIP-H text width, per-block head sizes, linear projections.
    "sd21": {
        **_SD15,
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
    },
    "sdxl": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# The random tiny UNets of engine/builtin.py (name -> family), with the tiny VAE's scale.
TINY_FAMILIES = {"tiny": "sd", "tiny-xl": "sdxl"}
BUILTIN = "builtin"
MODEL_NAMES = (*TINY_FAMILIES, *UNET_CONFIGS, BUILTIN)


class UnknownModel(CatEngineError):
    """A model name that is not in the table and not a diffusers folder."""


@dataclass(frozen=True)
class ModelSpec:
    """A UNet config plus the conditioning shapes a training step feeds it."""

    name: str
    config_json: str  # the UNet config, as sorted JSON (hashable cache key)
    text_tokens: int
    text_width: int
    pooled_width: int | None  # SDXL's pooled text embedding, else None
    vae_scale_factor: int
    unet_folder: str | None = None  # where the UNet's weights are (a diffusers folder), if anywhere

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def native_resolution(self) -> int:
        """The image side in pixels the UNet was configured for."""
        return int(self.config.get("sample_size", 64)) * self.vae_scale_factor


def spec_from_config(
    name: str, config: dict, vae_scale_factor: int = SD_VAE_SCALE, unet_folder: str | None = None
) -> ModelSpec:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    cross = config.get("cross_attention_dim") or 768
    width = cross[0] if isinstance(cross, (list, tuple)) else cross
    pooled = None
    if config.get("addition_embed_type") == "text_time":
        # SDXL: the added embedding is the pooled text plus 6 time ids, each embedded to addition_time_embed_dim.
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return ModelSpec(
        name,
        json.dumps(config, sort_keys=True, default=list),
        TEXT_TOKENS,
        int(width),
        pooled,
        vae_scale_factor,
        unet_folder,
    )


def _tiny_spec(name: str) -> ModelSpec:
    import torch

    from cat_engine.engine.builtin import NATIVE_RESOLUTION, tiny_unet

    with torch.device("meta"):  # only its config is wanted
        config = dict(tiny_unet(TINY_FAMILIES[name]).config)
    return spec_from_config(name, config, NATIVE_RESOLUTION // config["sample_size"])


def _folder_spec(name: str) -> ModelSpec | None:
    path = Path(name).expanduser()
    for unet_dir in (path / "unet", path):
        if (unet_dir / "config.json").is_file():
            config = json.loads((unet_dir / "config.json").read_text())
            factor = SD_VAE_SCALE
            vae_config = path / "vae" / "config.json"
            if vae_config.is_file():
                factor = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
            return spec_from_config(str(path), config, factor, str(unet_dir))
    return None


def resolve_model(model) -> ModelSpec:
    """A name of :data:`MODEL_NAMES`, a UNet config dict, a :class:`ModelSpec`, or a diffusers
    folder (with ``unet/config.json``, or a UNet folder with ``config.json``).

    Raises :class:`UnknownModel` (a ``ValueError``) for anything else.
    """
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, dict):
        return spec_from_config("custom", model)
    name = str(model)
    if name in UNET_CONFIGS:
        return spec_from_config(name, UNET_CONFIGS[name])
    if name in TINY_FAMILIES:
        return _tiny_spec(name)
    if name == BUILTIN:  # the built-in default (the toy world), read like any diffusers folder
        from cat_engine.engine.builtin import builtin_model_dir

        return dataclasses.replace(_folder_spec(str(builtin_model_dir())), name=BUILTIN)
    spec = _folder_spec(name)
    if spec is None:
        raise UnknownModel(
            f"unknown model {name!r}: use {', '.join(MODEL_NAMES)}, or a diffusers folder with unet/config.json"
        )
    return spec
