"""FLOP counts and saved-bytes counts against answers worked out by hand."""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from cat_engine.bench.measure import SavedTensorsMeter, Spread, count_flops

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
    from cat_engine.bench.presets import build_unet, make_batch, resolve_preset

    preset = resolve_preset("sd15")
    unet = build_unet(preset, "meta")
    b = make_batch(preset.config, 1, 512, preset.vae_scale, "meta")
    flops = count_flops(lambda: unet(b.noisy_latents, b.timesteps, encoder_hidden_states=b.token_embeds))
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
        loss = meter.checkpoint_func(toy, x)
    assert meter.bytes == M * K * 4  # x kept for the recompute; sigmoid's output not kept
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
