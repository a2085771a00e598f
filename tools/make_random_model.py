"""Write a full-size diffusers model folder with random weights, from configs (no download).

    python tools/make_random_model.py {sd15,sdxl} OUTDIR [--device cuda] [--dtype float16]

For measuring what a training process costs (peak memory, time) on SD1.5- and SDXL-sized models
where no real weights are available: the UNet from ``engine/unet_configs.py`` (the configs the
planner and the bench use), the SD/SDXL VAE, CLIP ViT-L text encoder (and SDXL's OpenCLIP
bigG-sized second encoder) at their published sizes, the engine's CLIP tokenizer, and a DDPM
scheduler. Every component is the real class, so ``cat-engine train --base OUTDIR`` takes the
code path a downloaded model takes. Weights are drawn on ``--device`` (a GPU makes SDXL's 3.5 B
parameters quick) and saved in ``--dtype`` as safetensors; the folder is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cat_engine.engine.builtin import clip_tokenizer, tiny_scheduler
from cat_engine.engine.files import write_folder_atomically
from cat_engine.engine.memory_plan import DTYPES
from cat_engine.engine.unet_configs import UNET_CONFIGS

FAMILIES = ("sd15", "sdxl")
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
CLIP_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)  # fmt: skip


def _text_config(sizes: dict):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        **sizes,
    )  # fmt: skip


def random_pipeline(family: str, device: str = "cpu", dtype: torch.dtype = torch.float16, seed: int = 0):
    """The pipeline of ``family`` with random weights, drawn on ``device``, returned on the CPU in ``dtype``."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    resolution = 512 if family == "sd15" else 1024
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIGS[family])
        vae = AutoencoderKL(
            **VAE, sample_size=resolution, scaling_factor=0.18215 if family == "sd15" else 0.13025
        )
        encoders = [CLIPTextModel(_text_config(CLIP_L))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(_text_config(CLIP_BIG_G)))
    if device != "meta":  # meta: shapes only (the tests count parameters)
        unet, vae, *encoders = (m.to("cpu", dtype) for m in (unet, vae, *encoders))
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer(), unet=unet, scheduler=tiny_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=tiny_scheduler(),
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.out / "model_index.json").exists():
        print(f"{args.out}: already a model folder, kept")
        return 0
    pipe = random_pipeline(args.family, args.device, DTYPES[args.dtype], args.seed)
    write_folder_atomically(args.out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"{args.out}: random {args.family} ({params / 1e9:.2f} B UNet parameters, {args.dtype})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
