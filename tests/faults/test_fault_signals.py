"""SIGINT and SIGTERM sent with ``os.kill`` to a real ``cat-engine train`` process at seeded random
moments, and a second run started on the same folder meanwhile.

Each trial: the second run is refused with the first one's PID; the signalled run exits with 128 +
the signal and one line naming the checkpoint it wrote; that checkpoint equals, tensor for tensor
(weights, optimizer, RNG), the one an uninterrupted run wrote at the same step; resumed, it goes on
exactly as the uninterrupted run did.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from faultkit import one_error, run_cli, train_argv
from safetensors.torch import load_file

from cat_engine.engine import checkpoint as ckpt

STEPS = 12


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run, with a checkpoint at every step."""
    from faultkit import tiny_base

    import cat_engine.cat.train as train_mod
    from cat_engine.cat.config import TrainConfig

    out = tmp_path_factory.mktemp("straight") / "run"
    config = TrainConfig(
        base=tiny_base(), rank=4, batch_size=1, lr=1e-3, steps=STEPS, save_every=1, keep_checkpoints=STEPS
    )
    config.output, config.device = str(out), "cpu"
    train_mod.train(config.validate(), progress=False)
    return out / ckpt.CHECKPOINTS


def _same_state(a, b):
    for name in (ckpt.LORA_FILE, ckpt.OPTIMIZER_TENSORS, ckpt.RNG_FILE):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (a, name)


def _wait_for_step(process, log, step, timeout=180.0):
    """Wait until ``log`` records ``step`` (the run's ``step``-th step is done)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.is_file() and log.read_text().count("\n") >= step:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {process.communicate()[1][-2000:]}")
        time.sleep(0.02)
    process.kill()
    pytest.fail(f"the run did not reach step {step} in time")


def test_signals_at_seeded_random_moments(tmp_path, capsys, straight):
    """Three trials at once (their start-up overlaps): each gets a seeded signal, step and delay."""
    trials = []
    for trial in range(3):
        rng = random.Random(18_000 + trial)
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        after, delay = rng.randint(1, STEPS - 5), rng.uniform(0.0, 0.3)  # into the step after ``after``
        out = tmp_path / f"run{trial}"
        argv = train_argv(out, "--steps", STEPS, "--save-every", 4)[1:]
        command = [sys.executable, "-m", "cat_engine", "train", *map(str, argv)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        trials.append((trial, signum, after, delay, out, process))
    try:
        for trial, signum, after, delay, out, process in trials:
            _wait_for_step(process, out / "train_log.jsonl", after)
            time.sleep(delay)
            os.kill(process.pid, signum)
            if trial == 0:  # a second run on the same folder meanwhile: refused, naming the first
                code, lines = run_cli(capsys, train_argv(out, "--steps", STEPS))
                assert code == 2
                assert f"--output {out} is in use by another cat-engine run (PID {process.pid}" in one_error(
                    lines
                )
        results = [(t, process.communicate(timeout=180)[1]) for t, *_, process in trials]
    finally:
        for *_, process in trials:
            if process.poll() is None:
                process.kill()
    for (trial, signum, after, _delay, out, process), (_, err) in zip(trials, results):
        _check_trial(capsys, straight, trial, signum, after, out, process.returncode, err)


def _check_trial(capsys, straight, trial, signum, after, out, returncode, err):
    assert returncode == 128 + signum, (trial, err[-3000:])
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    found = re.fullmatch(
        rf"cat-engine train: interrupted by {signal.Signals(signum).name} after step (\d+): "
        rf"checkpoint (\S+); continue with --resume latest",
        last,
    )
    assert found, (trial, last)
    step = int(found.group(1))
    path = out / ckpt.CHECKPOINTS / f"step-{step}"
    assert step >= after and found.group(2) == str(path) and ckpt.verify_checkpoint(path) is None
    _same_state(path, straight / f"step-{step}")
    if step + 1 <= STEPS:  # resumed, one step more: exactly the uninterrupted run
        code, lines = run_cli(
            capsys, train_argv(out, "--steps", step + 1, "--save-every", 4, "--resume", "latest")
        )
        assert code == 0, lines
        _same_state(out / ckpt.CHECKPOINTS / f"step-{step + 1}", straight / f"step-{step + 1}")
