"""Full-size UNet configurations (SD1.5, SD2.1, SDXL), built on the meta device: no download.

Used by the bench presets and the VRAM estimator. ``meta_unet("sd15")`` builds the 859,520,964-
parameter SD1.5 UNet in well under a second; FLOPs and shapes can be counted on it without memory.
"""

from __future__ import annotations

import torch

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
UNET_CONFIGS: dict[str, dict] = {
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
# Text-conditioning shapes that go with each UNet: (tokens, embedding width, pooled width or None).
TEXT_SHAPES = {"sd15": (77, 768, None), "sd21": (77, 1024, None), "sdxl": (77, 2048, 1280)}
NATIVE_RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
VAE_SCALE_FACTOR = 8


def meta_unet(name: str, device: str = "meta"):
    """Build a full-size UNet with uninitialised weights on ``device`` (``meta`` by default)."""
    from diffusers import UNet2DConditionModel

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; choose from {', '.join(UNET_CONFIGS)}")
    with torch.device(device):
        return UNet2DConditionModel(**UNET_CONFIGS[name])


def example_inputs(
    name: str, batch: int, resolution: int | None = None, device: str = "meta", dtype=torch.float32
):
    """``(latents, timesteps, encoder_hidden_states, added_cond_kwargs)`` of the right shapes."""
    resolution = resolution or NATIVE_RESOLUTION[name]
    side = resolution // VAE_SCALE_FACTOR
    tokens, width, pooled = TEXT_SHAPES[name]
    latents = torch.zeros(batch, 4, side, side, device=device, dtype=dtype)
    timesteps = torch.zeros(batch, device=device, dtype=torch.long)
    text = torch.zeros(batch, tokens, width, device=device, dtype=dtype)
    added = None
    if pooled is not None:
        added = {
            "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
        }
    return latents, timesteps, text, added
