"""``cat-engine train --nproc N [--nnodes M ...]``: the same command again, under torchrun.

One machine: ``--nproc N`` starts N local ranks (torchrun's standalone rendezvous). Several:
run the same command on every node with ``--nnodes M --rdzv-endpoint HOST:PORT`` (torchrun's c10d
rendezvous numbers the nodes as they join), or with ``--node-rank R`` as well (a scheduler's node
index: torchrun's static rendezvous, node 0 listening at the endpoint). ``--batch-size`` stays the
global batch, over ``N * M`` ranks; rank 0 (on whichever node it lands) writes the outputs.
"""

from __future__ import annotations

import argparse

from cat_engine.cat.config import ConfigError, config_from_args, flags_of
from cat_engine.engine import distributed as dist
from cat_engine.engine import signals


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel on N local ranks (GPUs; CPU processes without one) via torchrun",
    )
    parser.add_argument(
        "--nnodes", type=int, default=None, metavar="M", help="machines taking part (default 1)"
    )
    parser.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="where the nodes meet (torchrun's c10d rendezvous); the same on every node",
    )
    parser.add_argument(
        "--rdzv-id",
        default="cat-engine",
        metavar="ID",
        help="rendezvous id, the same on every node of one run",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        default=None,
        metavar="R",
        help="this node's index (e.g. $SLURM_NODEID): static rendezvous, node 0 listening at --rdzv-endpoint",
    )


def wants_torchrun(args: argparse.Namespace) -> bool:
    """Several ranks asked for, and this process is not one of them yet."""
    several = (args.nproc or 1) > 1 or (args.nnodes or 1) > 1
    return several and not dist.launched_by_torchrun()


def nodes_of(args: argparse.Namespace) -> dist.Nodes:
    count = 1 if args.nnodes is None else args.nnodes
    nodes = dist.Nodes(count, args.rdzv_endpoint, args.node_rank, args.rdzv_id)
    problem = nodes.problem()
    if problem:
        raise ConfigError(problem)
    return nodes


def rank_rows(batch_size: int, ranks: dist.DistContext) -> slice:
    """This rank's rows of the global batch; a batch that does not divide by the ranks is a config error."""
    try:
        return dist.local_rows(batch_size, ranks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def launch(args: argparse.Namespace) -> int:
    """Run this very command under torchrun, ``--nproc`` ranks on this node; return its exit code."""
    import subprocess

    nproc = args.nproc or 1
    if nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    nodes = nodes_of(args)
    if not args.manifest:
        config = config_from_args(args)  # fail here, once, rather than on every rank
        rank_rows(config.batch_size, dist.DistContext(0, nproc * nodes.count))
    manifest = ["--manifest", args.manifest] if args.manifest else []
    command = dist.torchrun_command(nproc, "cat_engine", ["train", *manifest, *flags_of(args)], nodes)
    # In a session of its own, so a Ctrl-C reaches torchrun once (through us), not twice: each
    # rank then stops at a step boundary with a checkpoint (engine/signals.py).
    with subprocess.Popen(command, start_new_session=True) as process:
        with signals.forward_signals(process):
            return process.wait()
