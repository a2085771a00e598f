"""The graph-captured training step: its warm-up, static buffers, undo and refusals on any machine
(through a stand-in for the CUDA graph that re-runs the recorded step), and real capture against
eager steps on a GPU."""

import copy

import pytest
import torch

from cat_engine.engine import cuda_graphs
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.cuda_graphs import CudaGraphError, GraphedStep, GraphedTrainStep, check_cuda_graphs

CUDA = torch.cuda.is_available()


class ReplayedGraph:
    """What a CUDA graph does, eagerly: capture records the step (its Python side runs, its
    effects on the tensors are rolled back, as a capture does not execute kernels); replay runs
    it again and writes the results into the captured outputs."""

    tensors = staticmethod(list)  # the tensors a capture must leave untouched (set by the test)

    def __init__(self, device):
        self.fn, self.outputs = None, ()

    def warm_up(self, fn):
        fn()

    def capture(self, fn):
        saved = [t.detach().clone() for t in self.tensors()]
        self.fn, self.outputs = fn, fn()
        with torch.no_grad():
            for t, s in zip(self.tensors(), saved):
                t.copy_(s)
        return self.outputs

    def replay(self):
        for t in self.tensors():  # the captured backward writes the gradients, it does not add to them
            t.grad = None
        results = self.fn()
        with torch.no_grad():
            for out, new in zip(self.outputs, results):
                out.copy_(new)


class TinyLora(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(6, 5, generator=g)
        self.a = torch.nn.Parameter(torch.randn(2, 5, generator=g))
        self.b = torch.nn.Parameter(torch.randn(6, 2, generator=g))

    def forward(self, x):
        return x @ self.w.t() + x @ self.a.t() @ self.b.t()


def setup(model):
    params = [model.a, model.b]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return params, opt, sched


def batches(n, rows=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 5, generator=g), torch.randn(rows, 6, generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    loss = ((model(x) - y) ** 2).mean()
    return loss, loss.detach() * 2


def eager_steps(model, data, max_norm=0.5):
    params, opt, sched = setup(model)
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y)[0].backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        sched.step()
    return params


def graphed(model, max_norm=0.5, warmup=3):
    params, opt, sched = setup(model)
    static_x, static_y = torch.zeros(4, 5), torch.zeros(4, 6)
    ReplayedGraph.tensors = staticmethod(
        lambda: [*params, *[t for p in params for t in opt.state.get(p, {}).values()]]
    )
    step = GraphedStep(
        lambda: loss_of(model, static_x, static_y), params, opt, max_grad_norm=max_norm, warmup=warmup,
        graph=ReplayedGraph,
    )  # fmt: skip
    return step, (static_x, static_y), params, opt, sched


def test_graphed_steps_equal_eager_steps_and_the_warm_up_leaves_no_trace():
    data = batches(5)
    want = eager_steps(TinyLora(), data)
    model = TinyLora()
    step, (sx, sy), params, opt, sched = graphed(model)
    for i, (x, y) in enumerate(data):
        sx.copy_(x)
        sy.copy_(y)
        loss, doubled, norm = step()
        assert doubled == pytest.approx(2 * loss.item())
        assert norm > 0 and norm.dim() == 0
        sched.step()
        if i == 0:  # three warm-up steps ran before the first: their updates are gone
            one = eager_steps(TinyLora(), data[:1])
            for p, w in zip(params, one):
                torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-7)
            assert opt.state[params[0]]["step"] == 1
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=1e-6, atol=1e-7)


def test_undo_puts_back_the_adapter_and_optimizer_state_of_before_the_step():
    model = TinyLora()
    step, (sx, sy), params, opt, _ = graphed(model)
    (x, y), (x2, y2) = batches(2)
    sx.copy_(x)
    sy.copy_(y)
    step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    sx.copy_(x2)
    sy.copy_(y2)
    step()
    assert any((p - b).abs().max() > 0 for p, b in zip(params, before))
    step.undo()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, state[k]), k


def test_graphed_train_step_copies_each_batch_into_static_buffers_per_shape(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "CudaGraph", ReplayedGraph)
    model = TinyLora()
    params, opt, _ = setup(model)
    ReplayedGraph.tensors = staticmethod(
        lambda: [*params, *[t for p in params for t in opt.state.get(p, {}).values()]]
    )
    seen = []

    def step_fn(batch):
        seen.append(batch)
        return loss_of(model, batch.noisy_latents, batch.target)

    train_step = GraphedTrainStep(step_fn, params, opt, max_grad_norm=1.0, graph=ReplayedGraph, warmup=1)

    def batch(rows, seed):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(rows, 5, generator=g), torch.randn(rows, 6, generator=g)
        return CatBatch(x, torch.zeros(rows), x, x, y, added_cond_kwargs={"time_ids": torch.ones(rows, 6)})

    first, second, other_shape = batch(4, 0), batch(4, 1), batch(3, 2)
    want = loss_of(copy.deepcopy(model), first.noisy_latents, first.target)[0]
    loss, _, _ = train_step(first)
    torch.testing.assert_close(loss, want)
    assert seen[0] is not first and torch.equal(seen[0].noisy_latents, first.noisy_latents)
    train_step(second)
    assert torch.equal(seen[-1].noisy_latents, second.noisy_latents) and seen[-1] is seen[0]  # same buffers
    train_step(other_shape)
    assert len(train_step.graphs) == 2 and seen[-1].noisy_latents.shape == (3, 5)


def test_cuda_graphs_are_refused_in_one_line_where_they_cannot_run():
    with pytest.raises(CudaGraphError, match="--cuda-graphs needs a CUDA device; this run is on cpu"):
        check_cuda_graphs("cpu")
    if CUDA:
        with pytest.raises(CudaGraphError, match="one process"):
            check_cuda_graphs("cuda", world=2)
        with pytest.raises(CudaGraphError, match="--compile reduce-overhead captures CUDA graphs itself"):
            check_cuda_graphs("cuda", compile_mode="reduce-overhead")
        with pytest.raises(CudaGraphError, match="fp16 loss scaling"):
            check_cuda_graphs("cuda", precision="fp16")
        check_cuda_graphs("cuda", compile_mode="default", precision="bf16")


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU"))],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_graphed_cat_steps_equal_eager_cat_steps(device, checkpointing):
    """N graphed CAT steps (split batch, clipping, AdamW) against N eager steps from the same start.
    On a GPU: real capture and replay, bf16 autocast, capturable fused AdamW; the LoRA parameters
    agree within bf16 rounding. On a CPU: the same code through the replaying stand-in, fp32."""
    from cat_engine.bench.presets import build_unet, make_batch
    from cat_engine.cat.loss import step_loss
    from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters
    from cat_engine.engine.memory_plan import MemoryPlan, apply_memory_plan, make_optimizer
    from cat_engine.engine.unet_configs import resolve_model

    spec = resolve_model("tiny")
    cuda = device == "cuda"

    def build():
        unet = fuse_lora(add_lora(build_unet(spec, "cpu"), rank=4, seed=0))
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        plan = MemoryPlan(precision="bf16" if cuda else "fp32", gradient_checkpointing=checkpointing)
        ctx = apply_memory_plan(unet, plan, device)
        unet.train()
        return ctx, lora_parameters(unet)

    data = [make_batch(spec, 2, spec.native_resolution, device, seed=i) for i in range(3)]
    loss_fn = step_loss(1.0)
    results = []
    for use_graph in (False, True):
        ctx, params = build()
        opt = make_optimizer(
            params, 1e-3, ctx.plan, device, **({"capturable": True} if cuda and use_graph else {})
        )
        if use_graph:
            graph = cuda_graphs.CudaGraph
            if not cuda:
                ReplayedGraph.tensors = staticmethod(
                    lambda params=params, opt=opt: [
                        *params,
                        *[t for p in params for t in opt.state.get(p, {}).values()],
                    ]
                )
                graph = ReplayedGraph
            step = GraphedTrainStep(
                lambda b, ctx=ctx: loss_fn(ctx.unet, b), params, opt, max_grad_norm=1.0, autocast=ctx.autocast,
                graph=graph,
            )  # fmt: skip
        for b in data:
            if use_graph:
                step(b)
            else:
                opt.zero_grad(set_to_none=True)
                with ctx.autocast():
                    loss = loss_fn(ctx.unet, b)[0]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
        results.append([p.detach().float().cpu() for p in params])
    tol = {"rtol": 2e-2, "atol": 2e-3} if cuda else {"rtol": 1e-5, "atol": 1e-6}
    moved = 0.0
    for eager, graphed_p, start in zip(*results, [p.detach().float().cpu() for p in build()[1]]):
        torch.testing.assert_close(graphed_p, eager, **tol)
        moved = max(moved, (eager - start).abs().max().item())
    assert moved > 1e-4  # the steps did train the adapter


def _trainer(tmp_path, name):
    from cat_engine.cat import train as train_mod
    from cat_engine.cat.config import TrainConfig
    from cat_engine.engine.builtin import builtin_model_dir

    fast = dict(rank=4, steps=3, save_every=0, batch_size=2, lr=1e-3, lr_warmup_steps=2)
    config = TrainConfig(output=str(tmp_path / name), base=str(builtin_model_dir(pretrained=False)), **fast)
    return train_mod, train_mod.Trainer.setup(config.validate())


def test_the_trainer_runs_graphed_steps_as_it_runs_eager_ones(tmp_path):
    """cat/train.py's graphed path (the replaying stand-in on a CPU): the same adapter as eager
    training, learning-rate warm-up included."""
    _, eager = _trainer(tmp_path, "eager")
    eager.train(progress=False)
    _, trainer = _trainer(tmp_path, "graphed")
    params, opt = list(trainer.lora.values()), trainer.optimizer
    ReplayedGraph.tensors = staticmethod(
        lambda: [*params, *[t for p in params for t in opt.state.get(p, {}).values()]]
    )
    trainer.graphed = GraphedTrainStep(
        trainer.step_fn, params, opt, max_grad_norm=trainer.config.max_grad_norm, autocast=trainer.memory.autocast,
        graph=ReplayedGraph,
    )  # fmt: skip
    trainer.train(progress=False)
    assert trainer.step == 3 and trainer.lr_schedule.get_last_lr() == eager.lr_schedule.get_last_lr()
    for name, p in trainer.lora.items():
        torch.testing.assert_close(p, eager.lora[name], rtol=1e-5, atol=1e-7)


def test_a_non_finite_graphed_step_is_undone_before_the_run_stops(tmp_path):
    train_mod, trainer = _trainer(tmp_path, "nan")

    class NanStep:
        undone = False

        def __call__(self, batch):
            return torch.tensor(float("nan")), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0)

        def undo(self):
            self.undone = True

    trainer.graphed = NanStep()
    with pytest.raises(train_mod.TrainingError, match="loss is nan at step 1"):
        trainer.run_step()
    assert trainer.graphed.undone and trainer.step == 0
