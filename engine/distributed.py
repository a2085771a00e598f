"""Data-parallel training on ``torch.distributed``: the process group, rank helpers, the DDP step.

Launched by ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment), a process
joins the group with gloo on the CPU and nccl on a GPU; launched plainly, it runs alone and every
helper here is a no-op, so the recipe has one code path for one process and for many. Several
machines take part through torchrun's own rendezvous (:class:`Nodes`): nothing here depends on
where a rank runs except its device, which is its local rank's.

The split-batch step (the CAT loss) needs the raw UNet: it reads the UNet's split state, walks its
modules and installs its own checkpoint function for the call. So DDP does not wrap the UNet; it
wraps :class:`TrainStep`, a module whose only parameters are the LoRA tensors and whose forward calls
the step's loss function on the UNet it holds. DDP then synchronises exactly those tensors: the
frozen weights are neither broadcast at start-up nor looked at by the reducer.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from cat_engine.engine.batch import CatBatch, StepLoss

# Environment variables torchrun sets in every process it starts.
WORLD_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world``; ``world == 1`` is a plain single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get(WORLD_ENV, "1")) > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join torchrun's process group (no-op when not launched by torchrun).

    ``device`` is the user's ``--device``: ``auto`` and ``cuda`` use nccl on ``cuda:LOCAL_RANK``,
    ``cpu`` uses gloo. Returns the rank context; :func:`device_for` gives this rank's device.
    """
    if not launched_by_torchrun():
        return SINGLE
    import torch.distributed as dist

    local = int(os.environ.get(LOCAL_RANK_ENV, "0"))
    cuda = _wants_cuda(device)
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local)


def current_context() -> DistContext:
    """This process's place in the initialised ``torch.distributed`` group, whoever set it up
    (torchrun with :func:`init_distributed`, accelerate, the caller); :data:`SINGLE` when none is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get(LOCAL_RANK_ENV, "0")))


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def device_for(device: str, ctx: DistContext) -> torch.device:
    """This rank's device: under torchrun a GPU per local rank, whatever index ``--device`` named."""
    cuda = _wants_cuda(device)
    if not ctx.enabled:
        if device == "auto":
            return torch.device("cuda" if cuda else "cpu")
        return torch.device(device)
    return torch.device("cuda", ctx.local_rank) if cuda else torch.device("cpu")


def shutdown(ctx: DistContext) -> None:
    """Leave the process group, after every rank has finished its last collective.

    Without the barrier a rank that finished an all-gather first could tear down its gloo
    connections while a peer was still receiving; the peer then aborted at exit ("terminate called
    without an active exception").
    """
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (a copy; the input unchanged). One rank: ``values``."""
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world


def gather_objects(ctx: DistContext, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    parts = [None] * ctx.world
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(ctx: DistContext, obj):
    """Rank 0's ``obj`` on every rank (an error found on rank 0 reaches all, so all stop alike)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_rows(global_batch: int, ctx: DistContext) -> slice:
    """This rank's rows of a global batch: equal, contiguous slices in rank order.

    Equal slices make DDP's mean of the per-rank mean losses equal the mean over the global batch.
    Raises ``ValueError`` when the batch does not divide by the number of ranks.
    """
    if global_batch % ctx.world:
        raise ValueError(
            f"--batch-size {global_batch} is the global batch and must divide by the {ctx.world} ranks "
            f"(e.g. {-(-global_batch // ctx.world) * ctx.world})"
        )
    per_rank = global_batch // ctx.world
    return slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


class TrainStep(torch.nn.Module):
    """``forward(batch)`` = ``loss_fn(model, batch)``; parameters: the trainable tensors only.

    ``loss_fn`` is the step's loss (:data:`~cat_engine.engine.batch.StepLoss`: a tuple of tensors,
    the differentiable loss first). The model is held outside the module tree (so DDP neither
    broadcasts nor inspects its frozen weights); ``params`` (the LoRA tensors) are registered here
    as the very ``Parameter`` objects of the model, so the gradients DDP reduces are the ones the
    optimizer steps.
    """

    def __init__(self, model: torch.nn.Module, params: list[torch.nn.Parameter], loss_fn: StepLoss):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule, on purpose (see the class doc)
        self.params = torch.nn.ParameterList(params)
        self.loss_fn = loss_fn

    def forward(self, batch: CatBatch) -> tuple[torch.Tensor, ...]:
        return self.loss_fn(self.model, batch)


def data_parallel(step: TrainStep, ctx: DistContext, device: torch.device):
    """``step`` wrapped in DDP when running on several ranks, else ``step`` itself.

    No ``static_graph`` even with gradient checkpointing: the engine's checkpoint Function
    recomputes each unit once, in a nested backward pass, and every LoRA tensor is used once per
    step, so each gradient hook fires exactly once and the reducer's end-of-backward callback is
    queued after the last bucket. tests/cat/test_distributed_train.py checks both ways against one
    process.
    """
    if not ctx.enabled:
        return step
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)


@dataclass(frozen=True)
class Nodes:
    """The machines of a torchrun launch: ``count`` of them, meeting at ``endpoint`` (``HOST:PORT``).

    Without ``node_rank`` the nodes meet through torchrun's c10d rendezvous, which numbers them in
    the order they join; with it (a scheduler's node index, e.g. ``$SLURM_NODEID``) through torchrun's
    static rendezvous, node 0 at ``endpoint``. One node and no endpoint: a standalone launch.
    """

    count: int = 1
    endpoint: str | None = None
    node_rank: int | None = None
    run_id: str = "cat-engine"

    def problem(self) -> str | None:
        """What is wrong with these options, for a one-line error; ``None`` when nothing is."""
        if self.count < 1:
            return "--nnodes must be >= 1"
        if self.count > 1 and not self.endpoint:
            return "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (a machine every node can reach)"
        if self.endpoint is not None:
            host, _, port = self.endpoint.rpartition(":")
            if not host or not port.isdigit():
                return f"--rdzv-endpoint {self.endpoint}: expected HOST:PORT"
        if self.node_rank is not None and not 0 <= self.node_rank < self.count:
            return f"--node-rank {self.node_rank} must be in [0, {self.count}) for --nnodes {self.count}"
        return None

    def torchrun_flags(self) -> list[str]:
        if self.count == 1 and self.endpoint is None:
            return ["--standalone"]
        if self.node_rank is None:
            return [
                f"--nnodes={self.count}",
                "--rdzv_backend=c10d",
                f"--rdzv_endpoint={self.endpoint}",
                f"--rdzv_id={self.run_id}",
            ]
        host, _, port = self.endpoint.rpartition(":")
        return [
            f"--nnodes={self.count}",
            f"--node_rank={self.node_rank}",
            f"--master_addr={host}",
            f"--master_port={port}",
        ]


def torchrun_command(nproc: int, module: str, args: list[str], nodes: Nodes = Nodes()) -> list[str]:
    """The command line that runs ``python -m module args`` on ``nproc`` ranks per node of ``nodes``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes.torchrun_flags(),
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]
