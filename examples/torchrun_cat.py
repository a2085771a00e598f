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
from accelerate_cat import parse_args, prepare, save, train

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
    data = prepare(args, device, world)

    loss_fn = data_parallel_cat_loss(data[0].unet)  # DDP over the LoRA tensors when several ranks run
    optimizer = torch.optim.AdamW(loss_fn.parameters(), lr=args.lr)
    train(args, data, loss_fn, optimizer, torch.Tensor.backward, rank, world, device)

    if dist.is_initialized():
        dist.barrier()
    save(args, data[0], rank, rank == 0)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
