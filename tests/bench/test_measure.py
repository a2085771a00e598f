"""FLOP counts, saved-bytes counts and the timer against answers worked out by hand."""

from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from cat_engine.bench.measure import (
    SavedTensorsMeter,
    Spread,
    count_flops,
    count_ops,
    counting_checkpoint,
    saved_bytes,
    time_interleaved,
)

M, K, N, R = 6, 40, 24, 4


class OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


def lora_linear(device="cpu"):
    model = OneLinear().requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=R, lora_alpha=R, target_modules=["proj"]), model)
    return model.to(device)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_flops_of_a_lora_linear_match_hand_count(device, input_grad):
    model = lora_linear(device)
    x = torch.randn(M, K).to(device).requires_grad_(input_grad)

    def forward():
        return model(x)

    def forward_backward():
        model(x).sum().backward()

    # forward: x W^T (+ b) = 2MKN; the LoRA branch x A^T = 2MKR, then (x A^T) B^T = 2MRN
    fwd = 2 * M * K * N + 2 * M * K * R + 2 * M * R * N
    # backward, W frozen: dB = dy^T u (2MRN), du = dy B (2MRN), dA = du^T x (2MKR);
    # dx only when x needs it: dy W (2MNK) + du A (2MRK)
    bwd = 2 * M * R * N + 2 * M * R * N + 2 * M * K * R
    if input_grad:
        bwd += 2 * M * N * K + 2 * M * R * K
    assert count_flops(forward) == fwd
    assert count_flops(forward_backward) == fwd + bwd


def test_sd15_forward_flops_on_meta():
    from cat_engine.bench.presets import build_unet, make_batch
    from cat_engine.engine.denoiser import unet_forward
    from cat_engine.engine.unet_configs import resolve_model

    spec = resolve_model("sd15")
    unet = build_unet(spec, "meta")
    b = make_batch(spec, 1, 512, "meta")
    flops = count_flops(lambda: unet_forward(unet, b.noisy_latents, b.timesteps, b.token_embeds))
    assert round(flops / 1e9) == 803  # docs/design.md §7


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(K, N, bias=False)

    def forward(self, x):
        h = self.lin(x)  # saves x (for dW) and W (for dx): W is a parameter
        a = torch.sigmoid(h)  # saves its output a
        b = a[:, : N // 2] * a[:, N // 2 :]  # saves two views of a: one storage, counted once
        return b.sum()  # saves no tensor


def test_saved_bytes_of_a_toy_module():
    toy = Toy()
    x = torch.randn(M, K, requires_grad=True)
    expected = M * K * 4 + M * N * 4
    meter = SavedTensorsMeter(exclude=toy.parameters())
    with meter:
        loss = toy(x)
    assert meter.bytes == expected
    loss.backward()  # the hooks leave the graph intact
    assert toy.lin.weight.grad is not None

    with SavedTensorsMeter() as everything:
        toy(x)
    assert everything.bytes == expected + K * N * 4  # the weight, when not excluded

    with torch.no_grad(), SavedTensorsMeter() as nothing:
        toy(x)
    assert nothing.bytes == 0


def test_saved_bytes_count_checkpointed_inputs_not_their_insides():
    toy = Toy()
    x = torch.randn(M, K, requires_grad=True)
    meter = SavedTensorsMeter(exclude=toy.parameters())
    with meter:
        loss = counting_checkpoint(toy, x)
    assert meter.bytes == M * K * 4  # x kept for the recompute; sigmoid's output not kept
    assert saved_bytes(lambda: counting_checkpoint(toy, x), exclude=toy.parameters()) == meter.bytes
    loss.backward()
    grad = x.grad.clone()
    x.grad = None
    toy(x).backward()
    torch.testing.assert_close(grad, x.grad)


def test_spread():
    s = Spread.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.median, s.q1, s.q3, s.min, s.max) == (3.0, 2.0, 4.0, 1.0, 5.0)
    assert Spread.of([2.0]).q1 == 2.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_counters_see_a_known_step():
    """The counters on a step whose costs are known by hand: a frozen linear then a LoRA-like matmul."""
    w = torch.randn(16, 8)  # frozen: a "parameter" of the module below
    a = torch.randn(8, 4, requires_grad=True)
    module = torch.nn.Linear(8, 16, bias=False)
    module.weight.data = w
    module.weight.requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)

    def forward():
        return (module(x) @ torch.ones(16, 1) + (x @ a).sum(1, keepdim=True)).sum()

    # forward: 5x8x16 + 5x16x1 + 5x8x4 multiply-adds; backward: the grads of x (two matmuls, the
    # frozen weight's included) and a; FlopCounterMode counts 2 per multiply-add.
    fwd = 2 * (5 * 8 * 16 + 5 * 16 * 1 + 5 * 8 * 4)
    bwd = 2 * (5 * 16 * 8 + 5 * 1 * 16 + 5 * 4 * 8 + 8 * 5 * 4)
    assert count_flops(lambda: forward().backward()) == fwd + bwd
    # Saved: the ones column (grad of the linear's output), x (grad of a) and a (grad of x); the
    # frozen linear saves only its weight, a parameter, which is not counted.
    with SavedTensorsMeter(exclude=module.parameters()) as meter:
        forward()
    assert meter.bytes == 4 * (5 * 8 + 16 * 1 + 8 * 4)
    assert saved_bytes(forward, exclude=module.parameters()) == meter.bytes


def test_timer_interleaves_rotates_and_restores_threads():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    threads = torch.get_num_threads()
    want = 2 if threads == 1 else 1  # a count other than the current one, to see it set and restored
    seen_threads = []

    @contextmanager
    def note_threads(name):
        seen_threads.append(torch.get_num_threads())
        yield

    times = time_interleaved(steps, 3, "cpu", warmup=1, threads=want, around=note_threads)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rotating rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert seen_threads == [want] * 9 and torch.get_num_threads() == threads
    cpu = time_interleaved({"a": lambda: sum(range(100_000))}, 2, clock="cpu")
    assert len(cpu["a"]) == 2 and min(cpu["a"]) > 0
    with pytest.raises(ValueError, match="clock"):
        time_interleaved(steps, 1, clock="sundial")
    with pytest.raises(ValueError, match="CUDA"):
        time_interleaved(steps, 1, "cpu", clock="cuda_events")


def test_op_counter_counts_what_reaches_the_kernels_forward_and_backward():
    """F.linear on 2-D input with a bias is ``t`` + ``addmm``; the backward of a frozen linear
    with an input that needs grad is one ``mm`` (plus the grad seed and views)."""
    x = torch.randn(M, K, requires_grad=True)
    w, b = torch.randn(N, K), torch.randn(N)
    counts = count_ops(lambda: torch.nn.functional.linear(x, w, b))
    assert dict(counts) == {"aten.t": 1, "aten.addmm": 1}
    y = torch.nn.functional.linear(x, w, b)
    backward = count_ops(lambda: y.sum().backward())
    assert backward["aten.mm"] == 1 and backward["aten.addmm"] == 0
