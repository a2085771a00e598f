"""Optimizers and schedules: checkpoint round trips of every state entry, the state the VRAM planner
counts against the real one, the schedules against diffusers', and the missing-package message."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from cat_engine.engine import vram
from cat_engine.engine.checkpoint import optimizer_from_files, optimizer_to_files
from cat_engine.engine.memory_plan import MemoryPlan, make_optimizer
from cat_engine.engine.optimizers import (
    LR_SCHEDULERS,
    OPTIMIZERS,
    OptimizerUnavailable,
    lr_factor,
    make_scheduler,
    state_bytes,
)

EXTRA = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def _optimizer(name, params):
    if name in EXTRA:
        pytest.importorskip(EXTRA[name])
    lr = 1.0 if name == "prodigy" else 1e-2
    return make_optimizer(params, lr, MemoryPlan(), "cpu", name=name, weight_decay=1e-2)


def _params():
    # one tensor above bitsandbytes' 8-bit threshold (4096 elements), one below it
    g = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(64, 80, generator=g)),
        torch.nn.Parameter(torch.randn(8, 4, generator=g)),
    ]


def _steps(optimizer, params, steps):
    for s in steps:
        g = torch.Generator().manual_seed(s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def _assert_same(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert list(a) == list(b), where
    else:
        assert a == b and type(a) is type(b), where


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_state_entry_round_trips_and_training_continues_bit_exactly(name):
    straight_params = _params()
    straight = _optimizer(name, straight_params)
    _steps(straight, straight_params, range(6))

    params = _params()
    first = _optimizer(name, params)
    assert first.param_groups[0]["weight_decay"] == 1e-2
    _steps(first, params, range(3))
    meta, tensors = optimizer_to_files(first)
    meta = json.loads(json.dumps(meta))  # as the checkpoint's JSON file holds it
    resumed = _optimizer(name, [torch.nn.Parameter(p.detach().clone()) for p in params])
    resumed.load_state_dict(optimizer_from_files(meta, dict(tensors)))
    _assert_same(first.state_dict()["state"], resumed.state_dict()["state"])
    groups = [{k: v for k, v in g.items()} for g in resumed.state_dict()["param_groups"]]
    for saved, loaded in zip(first.state_dict()["param_groups"], groups):
        assert saved.keys() == loaded.keys()
        for k in saved:
            assert (
                list(saved[k]) == list(loaded[k]) if isinstance(saved[k], tuple) else saved[k] == loaded[k]
            ), k
    resumed_params = [p for g in resumed.param_groups for p in g["params"]]
    _steps(resumed, resumed_params, range(3, 6))
    for a, b in zip(straight_params, resumed_params):
        assert torch.equal(a, b)


def test_a_state_entry_that_json_cannot_hold_is_refused():
    from cat_engine.engine.checkpoint import CheckpointError

    params = _params()
    optimizer = torch.optim.AdamW(params)
    _steps(optimizer, params, range(1))
    optimizer.state[params[0]]["odd"] = object()
    with pytest.raises(CheckpointError, match=r"optimizer state 0.odd: a object cannot be stored"):
        optimizer_to_files(optimizer)


def _tensors(state: dict) -> list[torch.Tensor]:
    """Every tensor of a per-parameter state, nested dicts included (bitsandbytes nests its buffers)."""
    out = []
    for value in state.values():
        out += _tensors(value) if isinstance(value, dict) else [value] if torch.is_tensor(value) else []
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_bytes_are_the_bytes_of_the_real_state(name):
    params = _params()
    optimizer = _optimizer(name, params)
    _steps(optimizer, params, range(1))
    for p in params:
        real = [t.numel() * t.element_size() for t in _tensors(optimizer.state[p]) if t.numel() > 1]
        assert sorted(real) == sorted(state_bytes(name, p.numel())), (
            name,
            p.shape,
        )  # step counters: 1 element


def test_the_planner_counts_each_optimizers_state():
    from cat_engine.cat.loss import step_loss

    est = {
        name: vram.estimate_peak("builtin", 64, 1, MemoryPlan(), 4, loss_fn=step_loss(1.0), optimizer=name)
        for name in OPTIMIZERS
    }
    assert est["adamw"].optimizer == 2 * est["adamw"].lora  # two fp32 moments
    assert est["prodigy"].optimizer == 4 * est["adamw"].lora  # four fp32 buffers
    # the tiny UNet's LoRA tensors are all under bitsandbytes' 8-bit threshold: 32-bit moments
    assert est["adamw8bit"].optimizer == est["adamw"].optimizer
    assert {e.activations for e in est.values()} == {est["adamw"].activations}
    sdxl = [
        vram._optimizer_bytes(vram._meta_lora_unet(vram.resolve_model("sd15"), 16), n) for n in OPTIMIZERS
    ]
    assert sdxl[1] < sdxl[0] / 3  # full-size tensors: 8-bit moments take about a quarter


@pytest.mark.parametrize("name", ["adamw8bit", "prodigy"])
def test_a_missing_package_is_one_line_saying_what_to_install(name, monkeypatch):
    monkeypatch.setitem(sys.modules, EXTRA[name], None)  # import fails as if not installed
    with pytest.raises(OptimizerUnavailable) as info:
        make_optimizer(_params(), 1e-3, MemoryPlan(), "cpu", name=name)
    assert str(info.value) == (
        f"--optimizer {name} needs {EXTRA[name]}, which is not installed: pip install 'cat-engine[{name}]'"
    )


# --- schedules -----------------------------------------------------------------------------------


def test_constant_schedule_is_the_old_warm_up():
    none = lr_factor("constant", 0, 100, 1e-4)
    assert [none(s) for s in range(5)] == [1, 1, 1, 1, 1]
    warm = lr_factor("constant", 4, 100, 1e-4)
    assert [warm(s) for s in range(6)] == [min(1.0, (s + 1) / 4) for s in range(6)]


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_schedules_are_diffusers_after_a_warm_up_that_learns_from_the_first_step(name):
    from diffusers.optimization import get_scheduler

    total, warmup = 40, 5
    factor = lr_factor(name, warmup, total, 0.5, num_cycles=2, power=2.0)
    params = [torch.nn.Parameter(torch.zeros(1))]
    reference = get_scheduler(
        "constant_with_warmup" if name == "constant" else name,
        torch.optim.SGD(params, lr=0.5),
        num_warmup_steps=warmup,
        num_training_steps=total,
        **({"num_cycles": 2} if name == "cosine_with_restarts" else {}),
        **({"power": 2.0} if name == "polynomial" else {}),
    ).lr_lambdas[0]
    assert [factor(s) for s in range(warmup)] == [(s + 1) / warmup for s in range(warmup)]
    assert [factor(s) for s in range(warmup, total)] == [reference(s) for s in range(warmup, total)]
    if name != "constant":
        assert factor(total - 1) < factor(warmup)  # it decays


def test_make_scheduler_drives_the_optimizer_and_saves_no_function():
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.2)
    schedule = make_scheduler(optimizer, "linear", 2, 10)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.1, 0.2, 0.2 * 8 / 8, 0.2 * 7 / 8])
    assert schedule.state_dict()["lr_lambdas"] == [None]
