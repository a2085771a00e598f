"""CAT in a training loop of your own, with accelerate: what embedding cat-engine takes.

    python examples/accelerate_cat.py --output runs/example                        # one process
    torchrun --nproc_per_node 2 examples/accelerate_cat.py --output runs/example   # 2 ranks (DDP)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_cat.py --output runs/example

(accelerate's own launcher starts several CPU ranks through mpirun only; torchrun starts them
anywhere, and accelerate picks its group up from the environment torchrun sets.)

Against a plain peft LoRA loop, three lines differ: ``fuse_lora(unet)`` after adding the adapter,
the loss is ``CatLoss(unet)`` (``cat_loss`` as a module whose parameters are the LoRA tensors), and
that module, not the UNet, is what ``accelerator.prepare`` wraps: DDP then averages the LoRA
gradients over the ranks while ``cat_loss`` gets the bare UNet it needs. ``--batch-size`` is the
global batch: every rank draws the same batch from the same seed and trains its own slice of it, so
N ranks train the adapter one process does. The loss comes back per sample
(``reduction="none"``) and is weighted here by min-SNR-5, as a trainer of your own would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from peft import LoraConfig
from PIL import Image
from safetensors.torch import save_file

from cat_engine.cat import CatLoss, plain_caption
from cat_engine.cat.dataset import builtin_concept_dir
from cat_engine.engine import fuse_lora, save_lora_files
from cat_engine.engine.models import load_base


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CAT of a LoRA adapter in an accelerate training loop")
    parser.add_argument("--base", default="builtin", help="diffusers SD1.x/2.x folder (default: built-in)")
    parser.add_argument("--data", default=str(builtin_concept_dir()), help="folder of concept images")
    parser.add_argument("--token", default="sks")
    parser.add_argument("--class-word", default="star")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2, help="global batch, over all ranks")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--each-rank",
        action="store_true",
        help="also write every rank's adapter to OUTPUT/rank-R.safetensors",
    )
    return parser.parse_args(argv)


@torch.no_grad()
def encode_images(model, folder: str, resolution: int) -> torch.Tensor:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    images = [np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution))) for f in files]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor


@torch.no_grad()
def encode_text(model, caption: str) -> torch.Tensor:
    tokenizer = model.tokenizers[0]
    ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    return model.text_encoders[0](ids.input_ids)[0]  # [1, 77, D]


def prepare(args, device, world: int):
    """``(model, latents, token_embeds, plain_embeds)``: the frozen model with a fused LoRA adapter
    on ``device``, the concept's latents and the two captions' embeddings. The same on every rank:
    the adapter's init comes from ``--seed``."""
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must divide by the {world} ranks")
    model = load_base(args.base)  # frozen, float32
    latents = encode_images(model, args.data, model.native_resolution)
    caption = f"a photo of {args.token} {args.class_word}"
    token_embeds = encode_text(model, caption).to(device)
    plain_embeds = encode_text(model, plain_caption(caption, args.token, args.class_word)).to(device)
    torch.manual_seed(args.seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = LoraConfig(
        r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets
    )
    model.unet.add_adapter(config)
    fuse_lora(model.unet)  # the split-batch LoRA layers: same Parameters, same state-dict keys
    model.unet.to(device).train()
    return model, latents, token_embeds, plain_embeds


def draw(model, latents, batch_size: int, generator: torch.Generator):
    """One global batch: ``(z_t, t, target, min-SNR-5 weight)`` per row, from ``generator``."""
    scheduler = model.noise_scheduler
    z = latents[torch.randint(len(latents), (batch_size,), generator=generator)]
    noise = torch.randn(z.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(z, noise, t)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    return scheduler.add_noise(z, noise, t), t, target, torch.clamp(snr, max=5.0) / snr


def save(args, model, rank: int, main: bool) -> None:
    output = Path(args.output)
    if main:
        info = {"token": args.token, "class_word": args.class_word, "resolution": model.native_resolution}
        for path in save_lora_files(model.unet, output, "both", {**info, "steps": args.steps}):
            print(f"saved {path}")  # diffusers and kohya (ComfyUI, AUTOMATIC1111) formats
    if args.each_rank:
        output.mkdir(parents=True, exist_ok=True)
        adapter = {
            n: p.detach().cpu().contiguous() for n, p in model.unet.named_parameters() if p.requires_grad
        }
        save_file(adapter, str(output / f"rank-{rank}.safetensors"))


def train(args, data, loss_fn, optimizer, backward, rank: int, world: int, device) -> None:
    """The loop: each rank draws the same global batch and trains on its own slice of the rows."""
    model, latents, token_embeds, plain_embeds = data
    per_rank = args.batch_size // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    generator = torch.Generator().manual_seed(args.seed)  # the same global batch on every rank
    for step in range(1, args.steps + 1):
        noisy, t, target, weights = (
            x[mine].to(device) for x in draw(model, latents, args.batch_size, generator)
        )
        token, plain = token_embeds.expand(per_rank, -1, -1), plain_embeds.expand(per_rank, -1, -1)
        out = loss_fn(noisy, t, token, plain, target, reduction="none")  # per-sample losses
        backward((out.loss * weights).mean())  # DDP averages the LoRA gradients here
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: ldm {out.ldm.mean():.4f} cat {out.cat.mean():.2e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    data = prepare(args, device, world)

    loss_fn = CatLoss(data[0].unet)  # cat_loss as a module; parameters: the LoRA tensors only
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=args.lr)
    loss_fn, optimizer = accelerator.prepare(loss_fn, optimizer)  # DDP around CatLoss, not the UNet
    train(args, data, loss_fn, optimizer, accelerator.backward, rank, world, device)

    accelerator.wait_for_everyone()
    save(args, data[0], rank, accelerator.is_main_process)
    accelerator.end_training()


if __name__ == "__main__":
    main()
