"""Tiny random diffusion-transformer pipelines: ``--base builtin-tiny-sd3``, ``-flux``, ``-zimage``.

Each is the family's real diffusers pipeline at a tiny size, random-initialised, so every code path
a full SD3/Flux/Z-Image folder takes (loading, prompt encoding, the transformer's blocks, LoRA files
``load_lora_weights`` reads) runs on a CPU in seconds, with nothing downloaded:

* the transformer at a few blocks of width 32, with the family's features on: SD3.5's dual
  attention and QK norm, Flux's single-stream blocks and guidance embedding (dev), Z-Image's refiners;
* a 16-channel VAE with the family's scaling and shift (4x downsampling: 64 px images, 16x16 latents);
* the family's text encoders at a tiny size: CLIP with the real CLIP vocabulary, T5 and Qwen3 with the
  small tokenizers of ``tools/make_dit_tokenizers.py`` (``engine/assets/{t5,qwen}_tokenizer``);
* the family's ``FlowMatchEulerDiscreteScheduler`` configuration (static shift 3 for SD3 and Z-Image,
  resolution-dependent shift for Flux).

Written once as a diffusers folder into the cache (``engine/builtin.py``), under a name that carries
a fingerprint of every component's configuration and of the tokenizer files.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
T5_TOKENIZER_DIR = ASSETS / "t5_tokenizer"
QWEN_TOKENIZER_DIR = ASSETS / "qwen_tokenizer"
NATIVE_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 4
LATENT_CHANNELS = 16
TEXT_WIDTH = 32  # T5 / Qwen3 hidden size = the transformers' text width
WIDTH = 32  # transformer width: 4 heads of 8
# (scaling_factor, shift_factor) of the families' VAEs.
VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159), "zimage": (0.3611, 0.1159)}
SCHEDULERS = {
    "sd3": dict(num_train_timesteps=1000, shift=3.0),
    "flux": dict(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "zimage": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
}
NAME_PREFIX = "builtin-tiny-{}-v1"


def tiny_transformer(family: str, **overrides):
    """The family's transformer at a tiny size (random weights from the current RNG)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel

    if family == "sd3":
        config = dict(
            sample_size=NATIVE_RESOLUTION // 4,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=TEXT_WIDTH,
            caption_projection_dim=WIDTH,
            pooled_projection_dim=32,  # two CLIP projections of 16
            pos_embed_max_size=16,
            dual_attention_layers=(0,),  # SD3.5's second attention in the first block
            qk_norm="rms_norm",
        )
        return SD3Transformer2DModel(**{**config, **overrides})
    if family == "flux":
        config = dict(
            patch_size=1,
            in_channels=LATENT_CHANNELS * 4,  # 2x2 packed
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=TEXT_WIDTH,
            pooled_projection_dim=32,  # the CLIP encoder's width
            guidance_embeds=True,  # dev-like; schnell has none
            axes_dims_rope=(2, 2, 4),
        )
        return FluxTransformer2DModel(**{**config, **overrides})
    if family == "zimage":
        config = dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=LATENT_CHANNELS,
            dim=WIDTH,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=4,
            n_kv_heads=4,
            cap_feat_dim=TEXT_WIDTH,
            axes_dims=[2, 2, 4],
            axes_lens=[256, 64, 64],
        )
        return ZImageTransformer2DModel(**{**config, **overrides})
    raise ValueError(f"no tiny transformer for family {family!r}")


def tiny_flow_vae(family: str):
    """The tiny VAE with 16 latent channels and the family's scaling and shift, no quant convs."""
    from cat_engine.engine.builtin import tiny_vae

    scaling, shift = VAE_SCALING[family]
    return tiny_vae(
        latent_channels=LATENT_CHANNELS,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def t5_tokenizer():
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(T5_TOKENIZER_DIR))


def qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(str(QWEN_TOKENIZER_DIR))


def _t5(vocab: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=TEXT_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _qwen3(vocab: int, pad_id: int):
    from transformers import Qwen3Config, Qwen3Model

    return Qwen3Model(
        Qwen3Config(
            vocab_size=vocab,
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            pad_token_id=pad_id,
        )
    )


def _scheduler(family: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULERS[family])


def _text_side(family: str) -> dict:
    """The family's tokenizers and text encoders, by pipeline component name."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from cat_engine.engine.builtin import _text_config, clip_tokenizer

    if family == "sd3":  # two CLIPs with projections of 16 (pooled 32), then T5
        t5_tok = t5_tokenizer()
        clips = {
            f"text_encoder{k}": CLIPTextModelWithProjection(_text_config(16, projection=16))
            for k in ("", "_2")
        }
        return {
            **clips,
            "tokenizer": clip_tokenizer(),
            "tokenizer_2": clip_tokenizer(),
            "text_encoder_3": _t5(len(t5_tok)),
            "tokenizer_3": t5_tok,
        }
    if family == "flux":  # CLIP (pooled 32), then T5
        t5_tok = t5_tokenizer()
        return {
            "text_encoder": CLIPTextModel(_text_config(32)),
            "tokenizer": clip_tokenizer(),
            "text_encoder_2": _t5(len(t5_tok)),
            "tokenizer_2": t5_tok,
        }
    tok = qwen_tokenizer()
    return {"text_encoder": _qwen3(len(tok), tok.pad_token_id), "tokenizer": tok}


def tiny_dit_pipeline(family: str, seed: int = 0):
    """The family's diffusers pipeline at a tiny size, random weights from ``seed``."""
    import diffusers

    from cat_engine.engine.families import DIT_FAMILIES

    if family not in DIT_FAMILIES:
        raise ValueError(f"no tiny pipeline for family {family!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components = dict(
            transformer=tiny_transformer(family), vae=tiny_flow_vae(family), **_text_side(family)
        )
    pipeline_cls = getattr(diffusers, DIT_FAMILIES[family].pipeline_class)
    return pipeline_cls(scheduler=_scheduler(family), **components)


def _tokenizer_files_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted([*T5_TOKENIZER_DIR.iterdir(), *QWEN_TOKENIZER_DIR.iterdir()]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:6]


@functools.lru_cache(maxsize=None)
def tiny_dit_name(family: str) -> str:
    """The cache folder name of the family's tiny pipeline: definition version and fingerprints."""
    from cat_engine.engine.builtin import _fingerprint

    return f"{NAME_PREFIX.format(family)}-{_fingerprint(tiny_dit_pipeline(family))}{_tokenizer_files_hash()}"
