"""cat/launch.py: the torchrun command of ``--nproc`` / ``--nnodes`` and its one-line refusals."""

import argparse

import pytest

from cat_engine.cat import train as train_mod
from cat_engine.cat.config import ConfigError


def _args(*argv):
    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    return parser.parse_args(list(argv))


def _command(seen, *argv):
    assert train_mod.launch(_args(*argv)) == 0
    command = seen["command"]
    return command[command.index("torch.distributed.run") + 1 : command.index("-m", 3)]


def test_c10d_rendezvous_across_nodes(fake_torchrun):
    flags = _command(
        fake_torchrun,
        *(
            "--nproc",
            "2",
            "--nnodes",
            "3",
            "--rdzv-endpoint",
            "node0:29400",
            "--rdzv-id",
            "job7",
            "--batch-size",
            "6",
        ),
    )
    assert flags == [
        "--nnodes=3",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400",
        "--rdzv_id=job7",
        "--nproc_per_node=2",
    ]


def test_static_rendezvous_with_a_node_rank(fake_torchrun):
    flags = _command(
        fake_torchrun,
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "10.0.0.5:29500",
        "--batch-size",
        "2",
    )
    assert flags == [
        "--nnodes=2",
        "--node_rank=1",
        "--master_addr=10.0.0.5",
        "--master_port=29500",
        "--nproc_per_node=1",
    ]


def test_one_node_is_standalone(fake_torchrun):
    assert _command(fake_torchrun, "--nproc", "2", "--batch-size", "2") == [
        "--standalone",
        "--nproc_per_node=2",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--nnodes", "2"), "--nnodes > 1 needs --rdzv-endpoint HOST:PORT"),
        (("--nnodes", "2", "--rdzv-endpoint", "node0"), "--rdzv-endpoint node0: expected HOST:PORT"),
        (("--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"), "--node-rank 2 must be in [0, 2)"),
        (("--nnodes", "2", "--rdzv-endpoint", "h:1", "--batch-size", "3"), "must divide by the 2 ranks"),
        (("--nnodes", "0", "--nproc", "2"), "--nnodes must be >= 1"),
    ],
)
def test_bad_launch_flags_are_one_line(argv, message):
    with pytest.raises(ConfigError) as exc:
        train_mod.launch(_args(*argv))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_several_ranks_relaunch_only_outside_torchrun(monkeypatch):
    from cat_engine.cat.launch import wants_torchrun

    assert wants_torchrun(_args("--nnodes", "2")) and wants_torchrun(_args("--nproc", "2"))
    assert not wants_torchrun(_args()) and not wants_torchrun(_args("--nproc", "1"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not wants_torchrun(_args("--nnodes", "2"))
