"""Pretrain the toy world's models: VAE, toy CLIP, then text encoder + UNet. Seeded and reproducible.

    OMP_NUM_THREADS=1 python tools/pretrain_toyworld.py            # writes engine/assets/toyworld{,_clip}

Phases (each a fixed number of steps, so the result does not depend on the machine's speed):
1. data: ``--images`` world examples (cat_engine.cat.toyworld, seed ``--seed``), 64 px;
2. VAE: diffusers ``AutoencoderKL``, 64 px -> 16x16x4 latents, trained on 32 px crops
   (it is fully convolutional) with an L1 + MSE reconstruction loss and a small KL term;
   ``scaling_factor`` = 1 / std of the latents;
3. toy CLIP: transformers ``CLIPModel`` (ViT 64 px / patch 8, text tower of width 32, the real CLIP
   BPE tokenizer), contrastive loss where identical captions count as positives of each other;
4. diffusion: ``UNet2DConditionModel`` on 16x16 latents, epsilon prediction, SD's scaled-linear
   schedule; the text encoder (a ``CLIPTextModel``) starts from the toy CLIP's text tower and is
   trained jointly; 10% empty captions for classifier-free guidance.

Determinism: every random draw comes from seeded generators; with the same thread count the
weights are bit-identical (set ``OMP_NUM_THREADS=1`` as the documented run does).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cat_engine.cat import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "engine" / "assets" / "toyworld"
DEFAULT_CLIP_OUT = ROOT / "engine" / "assets" / "toyworld_clip"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT_WIDTH = 32


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------- model configs
def text_config_kwargs() -> dict:
    return dict(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=TEXT_WIDTH * 4, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="quick_gelu",
    )


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=tw.SIZE,
    )


def make_clip():
    from transformers import CLIPConfig, CLIPModel

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  image_size=tw.SIZE, patch_size=8)
    return CLIPModel(CLIPConfig(text_config=text_config_kwargs(), vision_config=vision, projection_dim=32))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=tw.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=16,
    )


def make_scheduler():
    from cat_engine.engine.builtin import tiny_scheduler

    return tiny_scheduler("epsilon")


def clip_image_processor():
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    return cls(do_resize=True, size={"shortest_edge": tw.SIZE}, resample=3, do_center_crop=True,
               crop_size={"height": tw.SIZE, "width": tw.SIZE}, do_rescale=True, rescale_factor=1 / 255,
               do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


# ------------------------------------------------------------------------------------ phases
def train_vae(pixels: torch.Tensor, steps: int, seed: int):
    """pixels: [N, 3, 64, 64] in [-1, 1]."""
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n, batch, crop = pixels.shape[0], 32, 32
    t0 = time.time()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, 2e-3, 30))
        idx = torch.randint(0, n, (batch,), generator=g)
        ox, oy = torch.randint(0, tw.SIZE - crop + 1, (2,), generator=g).tolist()
        x = pixels[idx, :, oy : oy + crop, ox : ox + crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor):
    means, stds = [], []
    for start in range(0, pixels.shape[0], 128):
        post = vae.encode(pixels[start : start + 128]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / float(torch.sqrt((mean**2).mean() + (std**2).mean() - mean.mean() ** 2))
    vae.register_to_config(scaling_factor=scale)
    return mean * scale, std * scale, scale


def clip_pixels(images_u8: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def train_clip(images_u8: np.ndarray, scenes, steps: int, seed: int, tokenizer):
    torch.manual_seed(seed + 1)
    clip = make_clip()
    opt = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.05)
    rng = random.Random(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)
    n, batch = len(scenes), 128
    class_tokens = tokenizer([tw.class_prompt(c) for c in tw.CLASSES], padding=True, return_tensors="pt")
    t0 = time.time()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, 2e-3, 30))
        idx = torch.randint(0, n, (batch,), generator=g).tolist()
        texts = [tw.caption(scenes[i], rng) for i in idx]
        x = clip_pixels(images_u8[idx])
        if rng.random() < 0.5:  # horizontal flips keep every caption true
            x = x.flip(-1)
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        img = F.normalize(_feat(clip.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(_feat(clip.get_text_features(**tokens)), dim=-1)
        scale = clip.logit_scale.exp().clamp(max=100)
        logits = img @ txt.T * scale
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        # Zero-shot class term: the image against the 8 class prompts. Colour and background are
        # easy for a small ViT and dominate the caption loss; this term makes it learn the shapes.
        cls_txt = F.normalize(_feat(clip.get_text_features(**class_tokens)), dim=-1)
        labels = torch.tensor([tw.CLASSES.index(scenes[i].cls) for i in idx])
        cls_logits = img @ cls_txt.T * scale
        loss = loss + F.cross_entropy(cls_logits, labels)
        accuracy = (cls_logits.argmax(1) == labels).float().mean().item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"clip step {step}/{steps} loss {loss.item():.4f} class top-1 {accuracy:.2f} ({time.time() - t0:.0f} s)")
    clip.eval().requires_grad_(False)
    return clip


def _feat(out):
    return out if torch.is_tensor(out) else out.pooler_output


def train_diffusion(lat_mean, lat_std, scenes, clip, steps: int, seed: int, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 2)
    unet = make_unet()
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs()))
    text_encoder.load_state_dict(clip.text_model.state_dict())
    scheduler = make_scheduler()
    params = [{"params": list(unet.parameters()), "lr_scale": 1.0},
              {"params": list(text_encoder.parameters()), "lr_scale": 1.0}]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    unet.train()
    text_encoder.train()
    rng = random.Random(seed + 2)
    g = torch.Generator().manual_seed(seed + 2)
    n, batch, peak = len(scenes), 48, 8e-4
    alphas = scheduler.alphas_cumprod
    t0 = time.time()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, peak, 50))
        idx = torch.randint(0, n, (batch,), generator=g)
        texts = [tw.caption(scenes[i], rng) if rng.random() >= 0.1 else "" for i in idx.tolist()]
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        emb = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, scheduler


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--clip-out", type=Path, default=DEFAULT_CLIP_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--vae-steps", type=int, default=500)
    parser.add_argument("--clip-steps", type=int, default=400)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results are exact per count)")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="skip phase 2: load the VAE of an earlier run of this script (same seed and data)")
    args = parser.parse_args()

    from diffusers import StableDiffusionPipeline

    from cat_engine.engine.builtin import clip_tokenizer

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    timings = {}
    tokenizer = clip_tokenizer()

    t = time.time()
    images, _, scenes = tw.dataset(args.images, seed=args.seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    timings["data_s"] = time.time() - t
    log(f"data: {len(scenes)} images in {timings['data_s']:.0f} s")

    t = time.time()
    if args.vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from / "vae", local_files_only=True).eval().requires_grad_(False)
    else:
        vae = train_vae(pixels, args.vae_steps, args.seed)
    lat_mean, lat_std, scale = encode_all(vae, pixels)
    timings["vae_s"] = time.time() - t
    log(f"vae: scaling_factor {scale:.4f}, {timings['vae_s']:.0f} s")

    t = time.time()
    clip = train_clip(images, scenes, args.clip_steps, args.seed, tokenizer)
    timings["clip_s"] = time.time() - t

    t = time.time()
    unet, text_encoder, scheduler = train_diffusion(lat_mean, lat_std, scenes, clip, args.unet_steps, args.seed,
                                                    tokenizer)
    timings["unet_s"] = time.time() - t

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(args.out, safe_serialization=True)
    args.clip_out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(args.clip_out, safe_serialization=True)
    clip_image_processor().save_pretrained(args.clip_out)
    tokenizer.save_pretrained(args.clip_out)
    timings["total_s"] = time.time() - t_start
    info = {"command": "OMP_NUM_THREADS=1 python tools/pretrain_toyworld.py", "args": {k: str(v) for k, v in vars(args).items()},
            "timings": {k: round(v, 1) for k, v in timings.items()}, "torch": torch.__version__}
    (args.out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"done in {timings['total_s']:.0f} s: {args.out}, {args.clip_out}")


if __name__ == "__main__":
    main()
