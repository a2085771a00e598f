"""The loop of accelerate_cat.py with torch.distributed alone: ``data_parallel_cat_loss(unet)``.

    python examples/torchrun_cat.py --output runs/example                          # one process
    torchrun --nproc_per_node 2 examples/torchrun_cat.py --output runs/example     # 2 ranks
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \
        --rdzv_id my-run examples/torchrun_cat.py --output runs/example            # on each of 2 machines

``data_parallel_cat_loss`` wraps ``CatLoss(unet)`` in DDP when the process group has several ranks
(and returns it unwrapped otherwise), so the same loop runs on one process and on many.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from accelerate_cat import draw, parse_args, prepare, save

from cat_engine.cat import data_parallel_cat_loss


def main(argv=None) -> None:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, latents, token_embeds, plain_embeds = prepare(args, device)

    loss_fn = data_parallel_cat_loss(model.unet)  # DDP over the LoRA tensors when several ranks run
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=args.lr)

    per_rank = args.batch_size // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    generator = torch.Generator().manual_seed(args.seed)  # the same global batch on every rank
    for step in range(1, args.steps + 1):
        noisy, t, target, weights = (
            x[mine].to(device) for x in draw(model, latents, args.batch_size, generator)
        )
        token, plain = token_embeds.expand(per_rank, -1, -1), plain_embeds.expand(per_rank, -1, -1)
        out = loss_fn(noisy, t, token, plain, target, reduction="none")
        (out.loss * weights).mean().backward()  # DDP averages the LoRA gradients here
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: ldm {out.ldm.mean():.4f} cat {out.cat.mean():.2e}")

    if dist.is_initialized():
        dist.barrier()
    save(args, model, rank, rank == 0)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
