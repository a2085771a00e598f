"""Bench models: a name of ``engine/unet_configs.py``'s table (or a local diffusers folder) -> a
denoiser (a UNet or a diffusion transformer) and a batch of the right shapes.

| preset  | UNet                                              | default resolution |
|---------|---------------------------------------------------|--------------------|
| tiny    | the built-in tiny SD-shaped UNet (engine.builtin) | 64 px (latent /4)  |
| tiny-xl | the same, SDXL-shaped (text_time conditioning)    | 64 px (latent /4)  |
| small   | a mid-size SD-shaped UNet                         | 256 px             |
| sd15    | full-size SD1.5 config, random weights            | 512 px             |
| sd21    | full-size SD2.1 config, random weights            | 768 px             |
| sdxl    | full-size SDXL config, random weights             | 1024 px            |
| builtin | the toy world shipped with the engine (its weights) | 64 px            |
| flux, flux-schnell | full-size Flux.1 dev / schnell transformer, random | 1024 px |
| sd3-medium, sd35-medium, sd35-large | full-size SD3 / SD3.5 transformers, random | 1024 px |
| zimage  | full-size Z-Image transformer, random             | 1024 px            |
| tiny-sd3, tiny-flux, tiny-zimage | the random tiny transformers (engine.builtin_dit) | 64 px |

Nothing is downloaded. Named models are random-initialised directly on the target device
(building SDXL's 2.6 B parameters, or Flux's 12 B, on a CPU first would take longer than the bench).
A transformer's batch is its family's (``engine/families/``): latents, text of the pipeline's
length, pooled text or text mask.
"""

from __future__ import annotations

import torch

from cat_engine.engine.batch import CatBatch
from cat_engine.engine.families import dit_family
from cat_engine.engine.memory_plan import is_lora_name
from cat_engine.engine.unet_configs import ModelSpec


def build_unet(spec: ModelSpec, device: torch.device | str, seed: int = 0):
    """The model's denoiser (UNet or transformer) on ``device`` in float32, frozen, in eval mode.

    ``device="meta"`` gives a weightless copy for counting FLOPs. A folder model loads its
    safetensors weights (never pickles); a named config is random-initialised from ``seed``.
    """
    import diffusers

    device = torch.device(device)
    family = dit_family(spec.family)
    cls = diffusers.UNet2DConditionModel if family is None else getattr(diffusers, family.transformer_class)
    if spec.unet_folder is not None and device.type != "meta":
        unet = cls.from_pretrained(spec.unet_folder, use_safetensors=True, local_files_only=True).to(device)
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with device:
                unet = cls.from_config(spec.config)
    return unet.requires_grad_(False).eval()


def shared_weights_copy(unet):
    """A second UNet whose frozen tensors *are* ``unet``'s (no extra memory), without its LoRA layers.

    The bench keeps two UNets, one prepared the engine's way and one with peft's LoRA layers (the
    peers), without paying for two copies of the frozen weights.
    """
    with torch.device("meta"):
        twin = type(unet).from_config(unet.config)
    frozen = {k: v for k, v in unet.state_dict().items() if not is_lora_name(k)}
    # A LoRA-wrapped layer keeps its frozen weights under ``base_layer``; the plain twin does not.
    twin.load_state_dict({k.replace(".base_layer.", "."): v for k, v in frozen.items()}, assign=True)
    return twin.requires_grad_(False).eval()


def make_batch(spec: ModelSpec, batch: int, resolution: int, device, seed: int = 0) -> CatBatch:
    """Random inputs shaped for the model (float32; autocast casts them as the knobs say).

    The token and plain captions share SDXL's pooled text and time ids (``plain_added_cond_kwargs``
    is None).
    """
    device = torch.device(device)
    if resolution % spec.pixel_multiple:
        what = "the VAE scale" if spec.family is None else "the VAE scale times the 2x2 patches"
        raise ValueError(f"resolution {resolution} is not a multiple of {what} {spec.pixel_multiple}")
    side = resolution // spec.vae_scale_factor
    config = spec.config
    gen = torch.Generator().manual_seed(seed)
    family = dit_family(spec.family)
    if family is not None:
        return family.example_batch(config, batch, side, spec.text_tokens, generator=gen, device=device)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    added = None
    if spec.pooled_width is not None:
        added = {"text_embeds": randn(batch, spec.pooled_width), "time_ids": randn(batch, 6).abs() * 100}
    return CatBatch(
        noisy_latents=randn(batch, config.get("in_channels", 4), side, side),
        timesteps=torch.randint(0, 1000, (batch,), generator=gen).to(device),
        token_embeds=randn(batch, spec.text_tokens, spec.text_width),
        plain_embeds=randn(batch, spec.text_tokens, spec.text_width),
        target=randn(batch, config.get("out_channels", 4), side, side),
        added_cond_kwargs=added,
    )
