"""A process killed (SIGKILL: no cleanup runs) at each point of a checkpoint save: re-saving an
existing ``step-N``, and pruning. Whatever the moment, after the next start's tidy-up ``step-N`` is a
complete checkpoint (the old copy or the new one), the older checkpoints are byte for byte as they
were, and no temporary folder is left."""

from __future__ import annotations

import itertools
import os
import signal

import pytest
import torch
from faultkit import snapshot

from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine import files


def _save(root, step, seed, keep=None):
    """A checkpoint whose content depends on ``seed`` (its trainer state records it)."""
    torch.manual_seed(seed)
    params = {
        "a.lora_A.weight": torch.nn.Parameter(torch.randn(4, 8)),
        "a.lora_B.weight": torch.nn.Parameter(torch.randn(8, 4)),
    }
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    sum((p**2).sum() for p in params.values()).backward()
    optimizer.step()
    return ckpt.save_checkpoint(
        root, step, params, optimizer, torch.Generator().manual_seed(seed), {"seed": seed}, keep=keep
    )


def _killed_at(monkeypatch, owner, name, call):
    """Make the ``call``-th call of ``owner.name`` (0-based) kill this process before it runs."""
    real, calls = getattr(owner, name), itertools.count()

    def wrapper(*args, **kwargs):
        if next(calls) == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def _in_a_child_that_is_killed(work):
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: killed inside ``work``, or exits 3 if it survived
        try:
            work()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the child was not killed"


# point -> (what to kill at, its call, the seed step-2 holds afterwards)
KILL_POINTS = {
    "while writing the files": ((ckpt, "_save_tensors"), 1, 1),
    "before the swap": ((files.os, "replace"), 0, 1),
    "between the two renames": ((files.os, "replace"), 1, 2),
    "before removing the old copy": ((files.shutil, "rmtree"), 0, 2),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_while_resaving_a_step_leaves_one_complete_copy(tmp_path, monkeypatch, point):
    _save(tmp_path, 1, seed=0)
    _save(tmp_path, 2, seed=1)
    step1 = snapshot(tmp_path / "checkpoints" / "step-1")
    (owner, name), call, holds = KILL_POINTS[point]

    def resave():
        _killed_at(monkeypatch, owner, name, call)
        _save(tmp_path, 2, seed=2)

    _in_a_child_that_is_killed(resave)
    ckpt.tidy_checkpoints(tmp_path)  # what the next run does first, under its lock
    step2 = tmp_path / "checkpoints" / "step-2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert ckpt.verify_checkpoint(step2) is None and ckpt.read_state(step2)["seed"] == holds
    assert ckpt.resolve_resume("latest", tmp_path) == step2
    assert snapshot(tmp_path / "checkpoints" / "step-1") == step1


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    for step in (1, 2):
        _save(tmp_path, step, seed=step)
    step2 = snapshot(tmp_path / "checkpoints" / "step-2")

    def save_and_prune():
        _killed_at(monkeypatch, ckpt.shutil, "rmtree", 0)  # step-1 renamed aside, not yet removed
        _save(tmp_path, 3, seed=3, keep=1)

    _in_a_child_that_is_killed(save_and_prune)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[1:] == ["step-2", "step-3"] and names[0].startswith(".step-1.pruned-")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    ckpt.tidy_checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert snapshot(tmp_path / "checkpoints" / "step-2") == step2
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-3"
