"""engine/distributed.py: the generic training step DDP wraps, and the single-process no-ops."""

from __future__ import annotations

import torch

from cat_engine.engine.batch import CatBatch
from cat_engine.engine.distributed import SINGLE, TrainStep, data_parallel


def _batch(rows: int = 4) -> CatBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, generator=g)
    text = torch.randn(rows, 2, 3, generator=g)
    return CatBatch(x, torch.zeros(rows), text, text, torch.randn(rows, 3, generator=g))


def test_train_step_holds_only_its_parameters_and_runs_the_given_loss():
    model = torch.nn.Linear(3, 3).requires_grad_(False)
    scale = torch.nn.Parameter(torch.ones(3))
    calls = []

    def loss_fn(m, batch):
        calls.append((m, batch))
        pred = m(batch.noisy_latents) * scale
        loss = ((pred - batch.target) ** 2).mean()
        return loss, loss.detach() * 2

    step = TrainStep(model, [scale], loss_fn)
    # the model is not a submodule: DDP sees (and synchronises) exactly the given tensors
    assert [id(p) for p in step.parameters()] == [id(scale)]
    assert list(step.children()) == [step.params] and step.model is model
    batch = _batch()
    loss, logged = step(batch)
    assert calls == [(model, batch)]
    assert torch.equal(logged, loss.detach() * 2)
    loss.backward()
    assert scale.grad is not None and model.weight.grad is None


def test_data_parallel_is_the_step_itself_in_one_process():
    step = TrainStep(
        torch.nn.Identity(), [torch.nn.Parameter(torch.zeros(1))], lambda m, b: (b.target.sum(),)
    )
    assert data_parallel(step, SINGLE, torch.device("cpu")) is step
