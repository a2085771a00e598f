"""Pretrain the toy world's models: VAE then text encoder + UNet, and the toy CLIP alongside. Seeded.

    python tools/pretrain_toyworld.py            # writes engine/assets/toyworld{,_clip}; ~1 h on 2 cores

Phases (each a fixed number of steps, so the result does not depend on the machine's speed):
1. data: ``--images`` world examples (cat_engine.cat.toyworld, seed ``--seed``), 64 px;
2. VAE: diffusers ``AutoencoderKL``, 64 px -> 16x16x4 latents, trained on 32 px crops (it is fully
   convolutional) with L1 + MSE + an edge (image-gradient) term, which keeps silhouettes sharp,
   and a small KL term; ``scaling_factor`` = 1 / std of the latents;
3. diffusion: ``UNet2DConditionModel`` on 16x16 latents, epsilon prediction, SD's scaled-linear
   schedule, min-SNR loss weights (gamma 5), an EMA of the weights (what is saved), the caption
   also pooled into the time embedding (``addition_embed_type="text"``: every ResNet block sees
   the class word, not only the cross-attention layers); a ``CLIPTextModel`` (real CLIP BPE
   tokenizer) trained jointly from a seeded random start; 10% empty captions for guidance;
4. toy CLIP, the KPS embedding model, in a second process while 2-3 run: a transformers
   ``AlignModel`` (a CLIP-style dual encoder whose image tower is a small EfficientNet: a ViT of this
   size learns colours and backgrounds but not shapes at this budget), tokenised with the CLIP
   tokenizer. First its image tower learns the world's attributes (class, colour, background,
   pattern, style) with linear heads, then both towers learn the contrastive caption loss plus a
   zero-shot class term (image against the 8 class prompts), the image tower at 1/10 the rate;
   saved in float16 (the evaluator loads it as float32) to keep the shipped weights small.

Determinism: every random draw comes from seeded generators and each process runs one thread,
so the weights are bit-identical from run to run on the same software stack.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cat_engine.cat import toyworld as tw
from cat_engine.engine.builtin_clip import CLIP_MEAN, CLIP_STD, tiny_clip_image_processor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "engine" / "assets" / "toyworld"
DEFAULT_CLIP_OUT = ROOT / "engine" / "assets" / "toyworld_clip"
TEXT_WIDTH = 32
EMBED_DIM = 160  # the toy CLIP's embedding size: the EfficientNet's pooled width at width_coefficient 0.5
BACKGROUNDS = (*tw.BACKGROUND_COLOURS, *tw.SCENES)


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
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=tw.SIZE,
    )


def make_clip():
    from transformers import AlignConfig, AlignModel, AlignTextConfig, AlignVisionConfig

    vision = AlignVisionConfig(image_size=tw.SIZE, width_coefficient=0.5, depth_coefficient=0.5, num_channels=3)
    text = AlignTextConfig(vocab_size=49408, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=77, pad_token_id=49407)
    return AlignModel(AlignConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=EMBED_DIM,
                                  temperature_init_value=0.07))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=tw.SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=16,
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def make_scheduler():
    from cat_engine.engine.builtin import tiny_scheduler

    return tiny_scheduler("epsilon")


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def set_lr(opt, lr):
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def world(n: int, seed: int):
    """The pretraining images (uint8 [N, 64, 64, 3]) and their scenes."""
    images, _, scenes = tw.dataset(n, seed=seed)
    return images, scenes


# ------------------------------------------------------------------------------------ phases
def _edges(x: torch.Tensor):
    return x[..., 1:, :] - x[..., :-1, :], x[..., 1:] - x[..., :-1]


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
        edge = sum(F.l1_loss(a, b) for a, b in zip(_edges(rec), _edges(x)))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 0.5 * edge + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
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


def _feat(out):
    return out if torch.is_tensor(out) else out.pooler_output


def _attributes(scene) -> list[int]:
    return [tw.CLASSES.index(scene.cls), list(tw.COLOURS).index(scene.colour), BACKGROUNDS.index(scene.background),
            tw.PATTERNS.index(scene.pattern), int(scene.painting)]


def train_clip(images_u8: np.ndarray, scenes, attribute_steps: int, steps: int, seed: int, tokenizer):
    """Image tower on the world's attributes first, then contrastive image-caption training."""
    torch.manual_seed(seed + 1)
    clip = make_clip()
    n, batch = len(scenes), 128
    g = torch.Generator().manual_seed(seed + 1)
    rng = random.Random(seed + 1)
    t0 = time.time()

    # (a) the image tower learns what is drawn (a supervised start: the text tower then only has to
    # find those directions, which is what makes zero-shot class accuracy reachable at this budget)
    labels = torch.tensor([_attributes(s) for s in scenes])
    heads = torch.nn.ModuleList([torch.nn.Linear(EMBED_DIM, k) for k in
                                 (len(tw.CLASSES), len(tw.COLOURS), len(BACKGROUNDS), len(tw.PATTERNS), 2)])
    params = list(clip.vision_model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    for step in range(attribute_steps):
        set_lr(opt, cosine_lr(step, attribute_steps, 2e-3, 30))
        idx = torch.randint(0, n, (batch,), generator=g)
        feats = _feat(clip.get_image_features(pixel_values=clip_pixels(images_u8[idx.numpy()])))
        loss = sum(F.cross_entropy(head(feats), labels[idx, k]) for k, head in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == attribute_steps - 1:
            log(f"clip attributes step {step}/{attribute_steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")

    # (b) contrastive captions + zero-shot class term; the image tower moves at 1/10 the rate
    others = [p for name, p in clip.named_parameters() if not name.startswith("vision_model.")]
    opt = torch.optim.AdamW([{"params": others}, {"params": list(clip.vision_model.parameters()), "lr_scale": 0.1}],
                            lr=2e-3, weight_decay=0.05)
    class_tokens = tokenizer([tw.class_prompt(c) for c in tw.CLASSES], padding=True, return_tensors="pt")
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, 2e-3, 50))
        idx = torch.randint(0, n, (batch,), generator=g).tolist()
        texts = [tw.caption(scenes[i], rng) for i in idx]
        x = clip_pixels(images_u8[idx])
        if rng.random() < 0.5:  # horizontal flips keep every caption true
            x = x.flip(-1)
        img = F.normalize(_feat(clip.get_image_features(pixel_values=x)), dim=-1)
        txt = F.normalize(_feat(clip.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt"))), dim=-1)
        temperature = clip.temperature.clamp(min=0.01)
        logits = img @ txt.T / temperature
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        cls_txt = F.normalize(_feat(clip.get_text_features(**class_tokens)), dim=-1)
        labels_b = torch.tensor([tw.CLASSES.index(scenes[i].cls) for i in idx])
        cls_logits = img @ cls_txt.T / temperature
        loss = loss + F.cross_entropy(cls_logits, labels_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            accuracy = (cls_logits.argmax(1) == labels_b).float().mean().item()
            log(f"clip step {step}/{steps} loss {loss.item():.4f} class top-1 {accuracy:.2f} ({time.time() - t0:.0f} s)")
    clip.eval().requires_grad_(False)
    return clip


def train_diffusion(lat_mean, lat_std, scenes, steps: int, seed: int, tokenizer, batch: int = 48,
                    peak: float = 2e-3, ema_decay: float = 0.999, snr_gamma: float = 5.0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed + 2)
    unet = make_unet()
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config_kwargs()))
    scheduler = make_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    ema = [copy.deepcopy(unet).eval().requires_grad_(False), copy.deepcopy(text_encoder).eval().requires_grad_(False)]
    unet.train()
    text_encoder.train()
    rng = random.Random(seed + 2)
    g = torch.Generator().manual_seed(seed + 2)
    n = len(scenes)
    alphas = scheduler.alphas_cumprod
    t0 = time.time()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, peak, 100))
        idx = torch.randint(0, n, (batch,), generator=g)
        texts = [tw.caption(scenes[i], rng) if rng.random() >= 0.1 else "" for i in idx.tolist()]
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        pred = unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        # min-SNR-gamma weights: the easy low-noise steps stop dominating the gradient
        snr = alphas[t] / (1 - alphas[t])
        loss = (((pred - noise) ** 2).mean((1, 2, 3)) * snr.clamp(max=snr_gamma) / snr).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for live, avg in zip((unet, text_encoder), ema):
                for p, q in zip(live.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    return ema[0], ema[1], scheduler


# ------------------------------------------------------------------------------ the processes
def clip_phase(args, out: Path) -> dict:
    """Phase 4, self-contained (it runs in its own process): data, toy CLIP, written to ``out``."""
    from cat_engine.engine.builtin import clip_tokenizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    t = time.time()
    images, scenes = world(args.images, args.seed)
    clip = train_clip(images, scenes, args.clip_attribute_steps, args.clip_steps, args.seed, clip_tokenizer())
    out.mkdir(parents=True, exist_ok=True)
    clip.to(torch.float16).save_pretrained(out, safe_serialization=True)  # half the bytes; eval loads it as float32
    tiny_clip_image_processor(tw.SIZE).save_pretrained(out)
    clip_tokenizer().save_pretrained(out)
    return {"clip_s": round(time.time() - t, 1)}


def _clip_child(args, out: Path, timings_file: Path) -> None:
    timings_file.write_text(json.dumps(clip_phase(args, out)))


def diffusion_phase(args, out: Path) -> dict:
    """Phases 1-3: data, VAE, text encoder + UNet, written to ``out`` as a diffusers folder."""
    from diffusers import StableDiffusionPipeline

    from cat_engine.engine.builtin import clip_tokenizer

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    timings = {}
    t = time.time()
    images, scenes = world(args.images, args.seed)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    timings["data_s"] = time.time() - t
    log(f"data: {len(scenes)} images in {timings['data_s']:.0f} s")

    t = time.time()
    vae = train_vae(pixels, args.vae_steps, args.seed)
    lat_mean, lat_std, scale = encode_all(vae, pixels)
    del pixels
    timings["vae_s"] = time.time() - t
    log(f"vae: scaling_factor {scale:.4f}, {timings['vae_s']:.0f} s")

    t = time.time()
    tokenizer = clip_tokenizer()
    unet, text_encoder, scheduler = train_diffusion(lat_mean, lat_std, scenes, args.unet_steps, args.seed, tokenizer)
    timings["unet_s"] = time.time() - t
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return {k: round(v, 1) for k, v in timings.items()}


def _replace_dir(tmp: Path, target: Path) -> None:
    """Swap a finished folder in; the old one is removed only after the new one is in place."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    shutil.move(tmp, target)  # a rename; a copy when --clip-out is on another file system
    if old.exists():
        shutil.rmtree(old)


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--clip-out", type=Path, default=DEFAULT_CLIP_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--clip-attribute-steps", type=int, default=300)
    parser.add_argument("--clip-steps", type=int, default=4000)
    parser.add_argument("--unet-steps", type=int, default=6500)
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: the toy CLIP trains in a second process (one thread each; same weights either way)")
    args = parser.parse_args()

    t_start = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.clip_out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=args.out.parent))
    try:
        clip_tmp, model_tmp, clip_timings = work / "clip", work / "model", work / "clip_timings.json"
        child = None
        if args.jobs == 2:
            child = multiprocessing.get_context("spawn").Process(target=_clip_child, args=(args, clip_tmp, clip_timings))
            child.start()
        else:
            clip_timings.write_text(json.dumps(clip_phase(args, clip_tmp)))
        timings = diffusion_phase(args, model_tmp)
        if child is not None:
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"the toy CLIP process failed (exit code {child.exitcode}); nothing was written")
        timings |= json.loads(clip_timings.read_text())
        timings["total_s"] = round(time.time() - t_start, 1)
        info = {"command": "python tools/pretrain_toyworld.py", "args": {k: str(v) for k, v in vars(args).items()},
                "timings_s": timings, "torch": torch.__version__, "threads_per_process": 1}
        (model_tmp / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
        _replace_dir(model_tmp, args.out)
        _replace_dir(clip_tmp, args.clip_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {timings['total_s']:.0f} s: {args.out}, {args.clip_out}")


if __name__ == "__main__":
    main()
