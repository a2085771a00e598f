"""The built-in default model: the pretrained toy world, and a tiny random pipeline for tests.

``builtin_model_dir()`` (the default of ``cat-engine train`` and ``eval``) is the **toy world**:
a small Stable-Diffusion-shaped pipeline pretrained by ``tools/pretrain_toyworld.py`` on the
procedural world of :mod:`cat_engine.cat.toyworld` (8 classes of shapes and creatures, colours,
patterns, backgrounds), shipped as a normal diffusers folder in ``engine/assets/toyworld``. It
knows its world, so CAT's effect on the plain prompt can be seen and measured.

The **random-initialised** tiny pipeline (``tiny_pipeline``, ``builtin_model_dir(pretrained=False)``
and every non-default family/prediction type) still exists so that tests of code paths run with no
download, on a CPU, in seconds; it produces noise-like images.

Every component is a real diffusers/transformers class (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel`` with the real CLIP BPE tokenizer, ``DDPMScheduler``), so
the code paths are the ones a full SD1.5/SDXL model takes. The random pipeline is written once as
a diffusers folder (safetensors) into a cache folder and reused.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from cat_engine.engine.files import write_folder_atomically

BUILTIN_NAME = "toyworld-v2"  # the id of the default model in reports
RANDOM_NAME = "builtin-tiny-sd-v1"  # cache folder prefix of the random tiny pipeline
TOYWORLD_DIR = Path(__file__).parent / "assets" / "toyworld"
TOKENIZER_DIR = Path(__file__).parent / "assets" / "clip_tokenizer"
NATIVE_RESOLUTION = 64  # pixels; latents are 16x16 (the tiny VAE downsamples by 4)
FAMILIES = ("sd", "sdxl")


def clip_tokenizer(max_length: int = 77):
    """The real CLIP BPE tokenizer (49,408 tokens), from the files shipped with the engine."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=max_length
    )


def _text_config(hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    if projection is not None:
        kwargs["projection_dim"] = projection
    return CLIPTextConfig(**kwargs)


def tiny_unet(family: str = "sd", **overrides):
    """A small SD-shaped (or SDXL-shaped: text_time added conditioning) UNet, random weights."""
    from diffusers import UNet2DConditionModel

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    config = dict(
        sample_size=NATIVE_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if family == "sdxl":
        config.update(
            cross_attention_dim=64,  # two text encoders of width 32, concatenated
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + 32,  # 6 time ids + pooled text (32)
            transformer_layers_per_block=1,
        )
    config.update(overrides)
    return UNet2DConditionModel(**config)


def tiny_vae(**overrides):
    """The tiny 4x VAE (4 latent channels; ``overrides`` change its config, as for the transformers')."""
    from diffusers import AutoencoderKL

    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_RESOLUTION,
    )
    return AutoencoderKL(**{**config, **overrides})


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def tiny_pipeline(family: str = "sd", prediction_type: str = "epsilon", seed: int = 0):
    """Build the tiny pipeline in memory (random weights from ``seed``)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet(family)
        vae = tiny_vae()
        if family == "sd":
            text_encoder = CLIPTextModel(_text_config(32))
            return StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=clip_tokenizer(),
                unet=unet,
                scheduler=tiny_scheduler(prediction_type),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        text_encoder = CLIPTextModel(_text_config(32))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(32, projection=32))
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(),
            unet=unet,
            scheduler=tiny_scheduler(prediction_type),
        )


def cache_root() -> Path:
    """Where generated models live: ``$CAT_ENGINE_CACHE``, else ``~/.cache/cat-engine``."""
    return Path(os.environ.get("CAT_ENGINE_CACHE") or Path.home() / ".cache" / "cat-engine")


def save_pipeline_atomically(pipe, target: Path) -> Path:
    """Save a pipeline as a diffusers folder under a temporary name, then rename it into place.

    When another process saved it first, theirs is kept.
    """
    return write_folder_atomically(
        target, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), replace_existing=False
    )


def _fingerprint(pipe) -> str:
    """A short hash of every component's config: a changed definition gets a new cache folder."""
    import hashlib
    import json

    import diffusers
    import transformers

    described = {"versions": [torch.__version__, diffusers.__version__, transformers.__version__]}
    for name, module in pipe.components.items():
        config = getattr(module, "config", None)
        if hasattr(config, "to_dict"):
            described[name] = config.to_dict()
        elif config is not None:
            described[name] = dict(config)
        elif module is not None:
            described[name] = [type(module).__name__, len(getattr(module, "encoder", {}) or {})]

    def stable(value):  # sets (diffusers' _use_default_values) print in hash order: sort them
        return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)

    described = {k: {n: v for n, v in d.items() if not str(n).startswith("_")} if isinstance(d, dict) else d
                 for k, d in described.items()}  # fmt: skip
    blob = json.dumps(described, sort_keys=True, default=stable)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


@functools.lru_cache(maxsize=None)
def _builtin_name(family: str, prediction_type: str) -> str:
    return f"{RANDOM_NAME}-{family}-{prediction_type}-{_fingerprint(tiny_pipeline(family, prediction_type))}"


def builtin_model_dir(
    family: str = "sd", prediction_type: str = "epsilon", *, pretrained: bool = True
) -> Path:
    """The built-in model as a diffusers folder.

    SD-family epsilon-prediction (the default) with ``pretrained``: the toy world
    (:data:`TOYWORLD_DIR`). Otherwise the random tiny pipeline, written once into the cache and
    reused. Its folder name carries a fingerprint of the components' configs, so a cache written by an
    older definition of the model is never picked up by mistake. The diffusion-transformer families
    (``sd3``, ``flux``, ``zimage``) have only a random tiny pipeline (``engine/builtin_dit.py``);
    ``prediction_type`` does not apply to them (they predict the flow velocity).
    """
    if family not in FAMILIES:
        from cat_engine.engine import builtin_dit

        target = cache_root() / builtin_dit.tiny_dit_name(family)
        if not (target / "model_index.json").exists():
            save_pipeline_atomically(builtin_dit.tiny_dit_pipeline(family), target)
        return target
    if (
        pretrained
        and (family, prediction_type) == ("sd", "epsilon")
        and (TOYWORLD_DIR / "model_index.json").is_file()
    ):
        return TOYWORLD_DIR
    target = cache_root() / _builtin_name(family, prediction_type)
    if not (target / "model_index.json").exists():
        save_pipeline_atomically(tiny_pipeline(family, prediction_type), target)
    return target
