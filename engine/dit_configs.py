"""Named diffusion transformers for the VRAM planner and the bench: full-size configurations and the tiny ones.

    spec = resolve_model("flux")           # engine/unet_configs.py resolves these names too
    spec.family, spec.config, spec.native_resolution

The full-size configurations are the ``transformer/config.json`` of the published diffusers folders
(nothing is downloaded); they build on the meta device for memory estimates and random-initialised
on a GPU for the bench:

==============  ==========================  =====================================================
name            model                       transformer
==============  ==========================  =====================================================
``flux``        Flux.1-dev                  ``FluxTransformer2DModel``, guidance-distilled
``flux-schnell``  Flux.1-schnell            the same without the guidance embedding
``sd3-medium``  Stable Diffusion 3 Medium   ``SD3Transformer2DModel``, 24 blocks
``sd35-medium`` Stable Diffusion 3.5 Medium 24 blocks, dual attention in the first 13, QK norm
``sd35-large``  Stable Diffusion 3.5 Large  38 blocks, QK norm
``zimage``      Z-Image (and Turbo)         ``ZImageTransformer2DModel``, 30 blocks + 4 refiners
==============  ==========================  =====================================================

``tiny-sd3``, ``tiny-flux``, ``tiny-zimage``: the random tiny transformers of ``engine/builtin_dit.py``
(the ``builtin-tiny-<family>`` folders' denoisers), for tests on a CPU.

Every full-size model here uses a VAE that downsamples 8x, 16 latent channels, and 1024 px as its
native resolution; the transformers cut the latents into 2x2 patches.
"""

from __future__ import annotations

import dataclasses

DIT_VAE_SCALE = 8
DIT_NATIVE_RESOLUTION = 1024
TINY_TEXT_TOKENS = 16

_FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
_SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)

# name -> (family, transformer config)
DIT_CONFIGS: dict[str, tuple[str, dict]] = {
    "flux": ("flux", _FLUX),
    "flux-schnell": ("flux", {**_FLUX, "guidance_embeds": False}),
    "sd3-medium": ("sd3", _SD3_MEDIUM),
    "sd35-medium": (
        "sd3",
        {
            **_SD3_MEDIUM,
            "pos_embed_max_size": 384,
            "dual_attention_layers": tuple(range(13)),
            "qk_norm": "rms_norm",
        },
    ),
    "sd35-large": (
        "sd3",
        {
            **_SD3_MEDIUM,
            "num_layers": 38,
            "num_attention_heads": 38,
            "caption_projection_dim": 2432,
            "qk_norm": "rms_norm",
        },
    ),
    "zimage": (
        "zimage",
        dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=2560,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=(32, 48, 48),
            axes_lens=(1536, 512, 512),
        ),
    ),
}
TINY_DITS = {f"tiny-{family}": family for family in ("sd3", "flux", "zimage")}
DIT_NAMES = (*DIT_CONFIGS, *TINY_DITS)


def dit_spec(name: str):
    """The :class:`~cat_engine.engine.unet_configs.ModelSpec` of a name of :data:`DIT_NAMES`."""
    from cat_engine.engine.unet_configs import spec_from_dit_config

    if name in DIT_CONFIGS:
        family, config = DIT_CONFIGS[name]
        return spec_from_dit_config(name, family, config, DIT_VAE_SCALE, DIT_NATIVE_RESOLUTION)
    import torch

    from cat_engine.engine.builtin_dit import NATIVE_RESOLUTION, tiny_transformer

    family = TINY_DITS[name]
    with torch.device("meta"):  # only its config is wanted
        config = dict(tiny_transformer(family).config)
    spec = spec_from_dit_config(name, family, config, 4, NATIVE_RESOLUTION)
    # Text as long as the tiny tokenizers make it: the tiny rotary tables have no room for 512 tokens.
    return dataclasses.replace(spec, text_tokens=TINY_TEXT_TOKENS)


def build_transformer(spec, device="meta"):
    """The transformer of ``spec`` on ``device`` (random weights from the current RNG; none on meta)."""
    import diffusers
    import torch

    from cat_engine.engine.families import DIT_FAMILIES

    cls = getattr(diffusers, DIT_FAMILIES[spec.family].transformer_class)
    with torch.device(device):
        return cls.from_config(spec.config)
