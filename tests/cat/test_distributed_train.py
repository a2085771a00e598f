"""Data-parallel training under torchrun (2 CPU ranks, gloo) equals one process on the same global batch.

Each torchrun launch starts two Python processes that load the tiny random model: a few tens of
seconds on a 2-core CPU, so the tests share launches where they can.
"""

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import build_config
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine.distributed import torchrun_command
from cat_engine.engine.lora import LORA_WEIGHT_NAME

FAST = dict(rank=4, batch_size=2, lr=1e-3, device="cpu", seed=3)
# Measured: 1.6e-6 to 6.5e-6 max abs difference after 2-4 steps (fp32; the two rows' gradients are
# summed in another order, and Adam's g / sqrt(v) amplifies that on small gradients). lora_B starts
# at zero and moves ~1e-3 per step at lr 1e-3, so a rank that trained on the wrong rows or missed the
# all-reduce is far outside the tolerance (checked by lora_b_moved).
TOL = 5e-5


def random_base() -> str:
    """The tiny random-weight model: code paths only, no dependence on a pretrained default."""
    from cat_engine.engine import builtin

    try:
        return str(builtin.builtin_model_dir(pretrained=False))
    except TypeError:  # a version without the pretrained toy world
        return str(builtin.builtin_model_dir())


def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(tmp_path, nproc: int = 2, **options):
    command = torchrun_command(
        nproc, "cat_engine", ["train", *_flags({"base": random_base(), **FAST, **options})]
    )
    result = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def single(**options):
    config = build_config({"base": random_base(), **FAST, **options}, {})
    return train_mod.train(config, progress=False)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def lora_b_moved(weights: dict) -> float:
    """The largest lora_B entry: how far training moved the adapter from its zero-initialised B.

    lora_B is ``lora_B`` in checkpoints and in the saved LoRA (peft names; older files said ``lora.up``).
    """
    return max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


def step_lora(output, step):
    return load_file(str(output / ckpt.CHECKPOINTS / f"step-{step}" / ckpt.LORA_FILE))


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume_on_another_rank_count(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: 4 steps of global batch 2, a checkpoint at step 2.
    single(output=str(one), steps=4, save_every=2)
    # Two ranks, one row each: the first 2 steps.
    torchrun(tmp_path, output=two, steps=2, save_every=0)
    diff = max_diff(step_lora(two, 2), step_lora(one, 2))
    moved = lora_b_moved(step_lora(one, 2))
    print(f"2 ranks vs 1 process after 2 steps: max abs diff {diff:.3g} (lora_B moved {moved:.3g})")
    assert diff < TOL < moved / 20
    # Only rank 0 wrote: one log line per step, not one per rank.
    assert len((two / train_mod.LOG_FILE).read_text().splitlines()) == 2

    # The 2-rank checkpoint resumed by one process continues the same run.
    single(output=str(two), steps=4, save_every=2, resume="latest")
    a, b = load_file(str(two / LORA_WEIGHT_NAME)), load_file(str(one / LORA_WEIGHT_NAME))
    diff = max_diff(a, b)
    print(f"2 ranks (2 steps) + 1 process (2 steps) vs 1 process (4 steps): max abs diff {diff:.3g}")
    assert diff < TOL


@pytest.mark.slow
def test_two_ranks_with_gradient_checkpointing_equal_one_process(tmp_path):
    # The checkpoint Function recomputes inside backward (a nested backward pass): DDP's gradient
    # hooks must still fire once per LoRA tensor and the all-reduce see every gradient.
    torchrun(tmp_path, output=tmp_path / "two", steps=3, save_every=0, gradient_checkpointing=True)
    single(output=str(tmp_path / "one"), steps=3, save_every=0, gradient_checkpointing=True)
    a = load_file(str(tmp_path / "two" / LORA_WEIGHT_NAME))
    b = load_file(str(tmp_path / "one" / LORA_WEIGHT_NAME))
    diff = max_diff(a, b)
    print(f"2 ranks vs 1 process, gradient checkpointing, 3 steps: max abs diff {diff:.3g}")
    assert diff < TOL < lora_b_moved(b) / 20


def test_global_batch_must_divide_by_the_ranks(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cat_engine", "train", "--nproc", "2", "--batch-size", "3"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--batch-size 3 is the global batch and must divide by the 2 ranks" in result.stderr
    assert "Traceback" not in result.stderr


def test_nproc_relaunches_the_same_options_under_torchrun(fake_torchrun):
    import argparse

    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    args = parser.parse_args(
        ["--nproc", "2", "--batch-size", "4", "--concept", "a/b:sks:dog", "--flip", "--no-compile"]
        + ["--targets", "to_q,to_v"]
    )
    seen = fake_torchrun
    assert train_mod.launch(args) == 0
    assert seen["kwargs"].get("start_new_session") is True
    command = seen["command"]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    rest = command[command.index("cat_engine") + 2 :]
    assert "--nproc" not in rest
    reparsed = parser.parse_args(rest)
    for name in ("concepts", "flip", "compile", "batch_size", "targets"):
        assert getattr(reparsed, name) == getattr(args, name), name


@pytest.mark.parametrize("world, batch", [(2, 4), (4, 4)])
def test_rank_slices_tile_the_global_batch(world, batch):
    from cat_engine.engine.distributed import DistContext, local_rows

    rows = [local_rows(batch, DistContext(r, world)) for r in range(world)]
    assert [i for s in rows for i in range(batch)[s]] == list(range(batch))


def _free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_equal_one_process(tmp_path):
    """``--nnodes 2`` through torchrun's c10d rendezvous: two "nodes" of one CPU rank each, each in its
    own folder as on two machines, on 127.0.0.1 only. Rank 0 lands on whichever node joins first;
    its folder gets the outputs, the other's none, and the adapter is the one one process trains."""
    port = _free_local_port()
    env = {**_env(), "PET_LOCAL_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}  # torchrun reads PET_*
    flags = _flags({"base": random_base(), **FAST, "steps": 2, "save_every": 0, "output": "out"})
    launch = [
        "--nproc",
        "1",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"t{port}",
    ]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for folder in nodes:
        folder.mkdir()
        command = [sys.executable, "-m", "cat_engine", "train", *launch, *flags]
        procs.append(
            subprocess.Popen(
                command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    written = [
        folder / "out" / LORA_WEIGHT_NAME for folder in nodes if (folder / "out" / LORA_WEIGHT_NAME).exists()
    ]
    assert len(written) == 1, "rank 0 alone writes the LoRA"
    single(output=str(tmp_path / "one"), steps=2, save_every=0)
    one = load_file(str(tmp_path / "one" / LORA_WEIGHT_NAME))
    diff = max_diff(load_file(str(written[0])), one)
    print(f"2 nodes vs 1 process after 2 steps: max abs diff {diff:.3g}")
    assert diff < TOL < lora_b_moved(one) / 20


@pytest.mark.slow
def test_two_ranks_accumulating_micro_batches_equal_one_process_on_the_whole_batch(tmp_path):
    # Each rank keeps the first micro-batch's gradients local (no_sync) and all-reduces with the last.
    torchrun(tmp_path, output=tmp_path / "two", steps=3, save_every=0, gradient_accumulation_steps=2)
    single(output=str(tmp_path / "one"), steps=3, save_every=0, batch_size=4)
    a = load_file(str(tmp_path / "two" / LORA_WEIGHT_NAME))
    b = load_file(str(tmp_path / "one" / LORA_WEIGHT_NAME))
    diff = max_diff(a, b)
    print(f"2 ranks x 2 micro-batches vs 1 process, batch 4, 3 steps: max abs diff {diff:.3g}")
    assert diff < TOL < lora_b_moved(b) / 20


@pytest.mark.slow
def test_two_ranks_training_the_text_encoder_with_micro_batches_equal_one_process(tmp_path):
    # The text encoders' LoRA joins the all-reduce; each micro-batch encodes its own rows' captions.
    options = dict(steps=3, save_every=0, train_text_encoder=True)
    torchrun(tmp_path, output=tmp_path / "two", gradient_accumulation_steps=2, **options)
    single(output=str(tmp_path / "one"), batch_size=4, **options)
    a = load_file(str(tmp_path / "two" / LORA_WEIGHT_NAME))
    b = load_file(str(tmp_path / "one" / LORA_WEIGHT_NAME))
    te = {k: v for k, v in b.items() if k.startswith("text_encoder.")}
    diff = max_diff(a, b)
    print(f"2 ranks x 2 micro-batches vs 1 process, text encoder trained, 3 steps: max abs diff {diff:.3g}")
    assert te and diff < TOL < lora_b_moved(te) / 20
