"""Bench presets: a name (or a local diffusers folder) -> a UNet and inputs of the right shapes.

| preset  | UNet                                              | default resolution |
|---------|---------------------------------------------------|--------------------|
| tiny    | the built-in tiny SD-shaped UNet (engine.builtin) | 64 px (latent /4)  |
| tiny-xl | the same, SDXL-shaped (text_time conditioning)    | 64 px (latent /4)  |
| small   | a mid-size SD-shaped UNet defined here            | 256 px             |
| sd15    | full-size SD1.5 config, random weights            | 512 px             |
| sd21    | full-size SD2.1 config, random weights            | 768 px             |
| sdxl    | full-size SDXL config, random weights             | 1024 px            |

Nothing is downloaded. Full-size UNets are random-initialised directly on the target device
(building SDXL's 2.6 B parameters on a CPU first would take longer than the bench).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_engine.engine.builtin import NATIVE_RESOLUTION as TINY_RESOLUTION
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.unet_configs import NATIVE_RESOLUTION, UNET_CONFIGS

TEXT_TOKENS = 77
SD_VAE_SCALE = 8
TINY_VAE_SCALE = 4  # the built-in tiny VAE has three blocks: downsampling by 4

# ~0.5 s per plain LoRA step on one CPU core at 256 px, batch 1: big enough that framework overhead
# does not dominate, small enough for a CPU run. SD1.5's block layout at a fifth of the width.
SMALL_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(64, 128, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

PRESETS = ("tiny", "tiny-xl", "small", "sd15", "sd21", "sdxl")


@dataclass
class Preset:
    """How to build one bench model: a diffusers config, or a folder to load from."""

    name: str
    config: dict | None  # UNet2DConditionModel kwargs; None when loading from ``folder``
    resolution: int  # default image side in pixels
    vae_scale: int  # pixels per latent pixel
    folder: Path | None = None


def resolve_preset(name_or_path: str) -> Preset:
    """A preset name from :data:`PRESETS`, or a local diffusers model folder (with ``unet/``)."""
    if name_or_path in ("tiny", "tiny-xl"):
        family = "sd" if name_or_path == "tiny" else "sdxl"
        return Preset(name_or_path, dict(tiny_unet(family).config), TINY_RESOLUTION, TINY_VAE_SCALE)
    if name_or_path == "small":
        return Preset("small", dict(SMALL_CONFIG), SMALL_CONFIG["sample_size"] * SD_VAE_SCALE, SD_VAE_SCALE)
    if name_or_path in UNET_CONFIGS:
        return Preset(
            name_or_path, dict(UNET_CONFIGS[name_or_path]), NATIVE_RESOLUTION[name_or_path], SD_VAE_SCALE
        )
    folder = Path(name_or_path).expanduser()
    unet_config = folder / "unet" / "config.json"
    if not unet_config.exists():
        raise ValueError(
            f"unknown preset {name_or_path!r}: choose from {', '.join(PRESETS)} "
            "or give a local diffusers model folder (with unet/config.json)"
        )
    config = json.loads(unet_config.read_text())
    vae_scale = SD_VAE_SCALE
    vae_config = folder / "vae" / "config.json"
    if vae_config.exists():
        vae_scale = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
    return Preset(folder.name, None, int(config["sample_size"]) * vae_scale, vae_scale, folder=folder)


def unet_config(preset: Preset) -> dict:
    if preset.config is not None:
        return preset.config
    return json.loads((preset.folder / "unet" / "config.json").read_text())


def build_unet(preset: Preset, device: torch.device | str, seed: int = 0):
    """The preset's UNet on ``device`` in float32, frozen, in eval mode.

    ``device="meta"`` gives a weightless copy for counting FLOPs. A folder preset loads its
    safetensors weights (never pickles); a config preset is random-initialised from ``seed``.
    """
    from diffusers import UNet2DConditionModel

    device = torch.device(device)
    if preset.folder is not None and device.type != "meta":
        unet = UNet2DConditionModel.from_pretrained(
            preset.folder, subfolder="unet", use_safetensors=True, local_files_only=True
        ).to(device)
    else:
        config = {k: v for k, v in unet_config(preset).items() if not k.startswith("_")}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with device:
                unet = UNet2DConditionModel(**config)
    return unet.requires_grad_(False).eval()


def shared_weights_copy(unet):
    """A second UNet whose frozen tensors *are* ``unet``'s (no extra memory), built on meta.

    The bench keeps two UNets, one with peft's LoRA layers (the peers) and one prepared by
    ``fuse_lora`` (the engine), without paying for two copies of the frozen weights.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    twin.load_state_dict(unet.state_dict(), assign=True)
    return twin.requires_grad_(False).eval()


@dataclass
class Batch:
    """One training batch of ``B`` rows: the same ``z_t``, ``t`` and noise for every CAT term."""

    noisy_latents: torch.Tensor  # [B, 4, h, w]
    timesteps: torch.Tensor  # [B] long
    token_embeds: torch.Tensor  # [B, 77, D] captions with the trigger token
    plain_embeds: torch.Tensor  # [B, 77, D] plain captions
    target: torch.Tensor  # [B, 4, h, w]
    added_cond_kwargs: dict | None = None  # SDXL: {"text_embeds": [B, P], "time_ids": [B, 6]}

    @property
    def rows(self) -> int:
        return int(self.noisy_latents.shape[0])

    def repeated(self, times: int) -> Batch:
        """The batch with every tensor repeated ``times`` along dim 0 (a LoRA step on ``times*B`` rows)."""

        def rep(x):
            return x.repeat(times, *([1] * (x.dim() - 1)))

        added = (
            None if self.added_cond_kwargs is None else {k: rep(v) for k, v in self.added_cond_kwargs.items()}
        )
        return Batch(
            rep(self.noisy_latents),
            rep(self.timesteps),
            rep(self.token_embeds),
            rep(self.plain_embeds),
            rep(self.target),
            added,
        )


def make_batch(config: dict, batch: int, resolution: int, vae_scale: int, device, seed: int = 0) -> Batch:
    """Random inputs shaped for a UNet ``config`` (float32; autocast casts them as the knobs say)."""
    device = torch.device(device)
    if resolution % vae_scale:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE scale {vae_scale}")
    side = resolution // vae_scale
    width = config["cross_attention_dim"]
    if isinstance(width, (list, tuple)):
        width = width[0]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    channels = config.get("in_channels", 4)
    added = None
    if config.get("addition_embed_type") == "text_time":
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        added = {"text_embeds": randn(batch, pooled), "time_ids": randn(batch, 6).abs() * 100}
    return Batch(
        noisy_latents=randn(batch, channels, side, side),
        timesteps=torch.randint(0, 1000, (batch,), generator=gen).to(device),
        token_embeds=randn(batch, TEXT_TOKENS, width),
        plain_embeds=randn(batch, TEXT_TOKENS, width),
        target=randn(batch, config.get("out_channels", 4), side, side),
        added_cond_kwargs=added,
    )
