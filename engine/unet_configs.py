"""Named UNets and the one resolver of a model name or folder, for the VRAM planner and the bench.

    spec = resolve_model("sdxl")        # or "sd15", "tiny", "builtin", a diffusers folder, a config dict
    spec.config, spec.native_resolution, spec.text_width, spec.pooled_width, spec.unet_folder
    spec = resolve_model("flux")        # a diffusion transformer (engine/dit_configs.py): spec.family

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

from cat_engine.engine.dit_configs import DIT_NAMES, dit_spec
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
MODEL_NAMES = (*TINY_FAMILIES, *UNET_CONFIGS, BUILTIN, *DIT_NAMES)


class UnknownModel(CatEngineError):
    """A model name that is not in the table and not a diffusers folder."""


@dataclass(frozen=True)
class ModelSpec:
    """A denoiser config plus the conditioning shapes a training step feeds it.

    ``family``: ``None`` for a UNet, else the diffusion transformer's family (``engine/families/``),
    whose ``example_batch`` makes its inputs; ``unet_folder`` is then the transformer's folder.
    """

    name: str
    config_json: str  # the UNet config, as sorted JSON (hashable cache key)
    text_tokens: int
    text_width: int
    pooled_width: int | None  # SDXL's pooled text embedding, else None
    vae_scale_factor: int
    unet_folder: str | None = None  # where the UNet's weights are (a diffusers folder), if anywhere
    family: str | None = None  # a diffusion transformer's family; None for a UNet
    native: int | None = None  # native resolution in pixels, where the config does not say it

    @property
    def config(self) -> dict:
        return json.loads(self.config_json)

    @property
    def native_resolution(self) -> int:
        """The image side in pixels the model was configured for."""
        if self.native is not None:
            return self.native
        return int(self.config.get("sample_size", 64)) * self.vae_scale_factor

    @property
    def pixel_multiple(self) -> int:
        """What a resolution must be a multiple of: the VAE's scale, times 2 for a transformer's 2x2 patches."""
        return self.vae_scale_factor * (1 if self.family is None else 2)


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


def spec_from_dit_config(
    name: str, family: str, config: dict, vae_scale_factor: int, native: int, folder: str | None = None
) -> ModelSpec:
    """The spec of a diffusion transformer of ``family`` (``engine/families/``) with ``config``."""
    from cat_engine.engine.families import DIT_FAMILIES

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    tokens = DIT_FAMILIES[family].max_sequence_length
    width = config.get("joint_attention_dim") or config.get("cap_feat_dim")
    return ModelSpec(
        name,
        json.dumps(config, sort_keys=True, default=list),
        tokens,
        int(width),
        config.get("pooled_projection_dim"),
        vae_scale_factor,
        folder,
        family,
        native,
    )


def _tiny_spec(name: str) -> ModelSpec:
    import torch

    from cat_engine.engine.builtin import NATIVE_RESOLUTION, tiny_unet

    with torch.device("meta"):  # only its config is wanted
        config = dict(tiny_unet(TINY_FAMILIES[name]).config)
    return spec_from_config(name, config, NATIVE_RESOLUTION // config["sample_size"])


def _dit_folder_spec(path: Path) -> ModelSpec | None:
    """A diffusers folder whose ``model_index.json`` names a transformer of a family the engine trains."""
    from cat_engine.engine.families import dit_family, family_of_index
    from cat_engine.engine.families.base import read_index, vae_geometry

    if not ((path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file()):
        return None
    try:
        family = dit_family(family_of_index(read_index(path)))
        native, factor = vae_geometry(path)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise UnknownModel(f"{path}: not a model the engine plans for ({exc})") from None
    if family is None:
        return None
    config = json.loads((path / "transformer" / "config.json").read_text())
    return spec_from_dit_config(str(path), family.name, config, factor, native, str(path / "transformer"))


def _folder_spec(name: str) -> ModelSpec | None:
    path = Path(name).expanduser()
    dit = _dit_folder_spec(path)
    if dit is not None:
        return dit
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
    """A name of :data:`MODEL_NAMES`, a UNet config dict, a :class:`ModelSpec`, a diffusers folder
    (with ``unet/config.json``, or a UNet folder with ``config.json``; or a transformer family's, with
    ``model_index.json`` and ``transformer/config.json``), or ``builtin-tiny-<family>``.

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
    if name in DIT_NAMES:
        return dit_spec(name)
    if name.startswith("builtin-tiny-"):  # the random tiny pipelines, generated on first use
        from cat_engine.engine.models import BUILTIN_TINY, resolve_base

        if name in BUILTIN_TINY:
            return dataclasses.replace(_folder_spec(str(resolve_base(name))), name=name)
    if name == BUILTIN:  # the built-in default (the toy world), read like any diffusers folder
        from cat_engine.engine.builtin import builtin_model_dir

        return dataclasses.replace(_folder_spec(str(builtin_model_dir())), name=BUILTIN)
    spec = _folder_spec(name)
    if spec is None:
        raise UnknownModel(
            f"unknown model {name!r}: use {', '.join(MODEL_NAMES)}, builtin-tiny-<family>, or a diffusers folder"
        )
    return spec
