"""lora_linear against a float64 oracle, through the reference path and the Triton code.

On CPU the Triton code runs under TRITON_INTERPRET=1 (set in conftest.py) when
CAT_ENGINE_FORCE_TRITON=1. The interpreter is slow, so shapes are small and odd rather than many.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from cat_engine.kernels import lora_linear
from cat_engine.kernels.reference import lora_linear_reference

# The package exports the function under the submodule's name, so fetch the module itself.
ll = importlib.import_module("cat_engine.kernels.lora_linear")

CUDA = torch.cuda.is_available()
# Max error over max |reference|, per dtype: a few units of the dtype's rounding at these sizes.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PATHS = ["reference", "triton"]


def _set_path(monkeypatch, path):
    monkeypatch.setenv(ll.FORCE_TRITON_ENV, "1" if path == "triton" else "0")


def _device():
    return "cuda" if CUDA else "cpu"


def _make(shape, K, N, r, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, K, generator=g, dtype=torch.float64)
    W = torch.randn(N, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    A = torch.randn(r, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    B = torch.randn(N, r, generator=g, dtype=torch.float64)  # non-zero: the delta must show
    return x, W, b, A, B


def _rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _run(x, W, b, A, B, scale, rows, dtype, lora_dtype=None, x_view=None, **kw):
    """Our op in ``dtype`` vs the float64 oracle: relative errors of y, dx, dA, dB."""
    dev, lora_dtype = _device(), lora_dtype or dtype
    xs = (x if x_view is None else x_view).to(dev, dtype).requires_grad_()
    As = A.to(dev, lora_dtype).requires_grad_()
    Bs = B.to(dev, lora_dtype).requires_grad_()
    bs = None if b is None else b.to(dev, dtype)
    y = lora_linear(xs, W.to(dev, dtype), bs, As, Bs, scale, rows, **kw)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y.backward(dy.to(dev, dtype))

    xr = (x if x_view is None else x_view).clone().requires_grad_()
    Ar, Br = A.clone().requires_grad_(), B.clone().requires_grad_()
    yr = lora_linear_reference(xr, W, b, Ar, Br, scale, rows)
    yr.backward(dy)
    zero = torch.zeros_like
    refs = (yr, xr.grad, Ar.grad if Ar.grad is not None else zero(A), Br.grad if Br.grad is not None else zero(B))
    outs = (y, xs.grad, As.grad, Bs.grad)
    assert all(o.dtype == want for o, want in zip(outs, (dtype, dtype, lora_dtype, lora_dtype)))
    return [(_rel_err(o.cpu(), r) if r.abs().max() > 0 else o.abs().max().item()) for o, r in zip(outs, refs)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [0, 2, None])
def test_odd_shapes_match_float64(monkeypatch, path, dtype, rows):
    """batch 3, 37 tokens, K=77, N=320, r=3: output and every gradient."""
    _set_path(monkeypatch, path)
    errs = _run(*_make((3, 37), 77, 320, 3), 0.7, rows, dtype)
    assert max(errs) <= TOL[dtype], errs


@pytest.mark.parametrize("path", PATHS)
def test_bf16(monkeypatch, path):
    if path == "triton" and not CUDA:
        pytest.skip("bf16 Triton is checked on GPU (the interpreter's bf16 tl.dot is wrong, docs/design.md §5)")
    _set_path(monkeypatch, path)
    errs = _run(*_make((2, 19), 40, 48, 5), 1.3, 1, torch.bfloat16)
    assert max(errs) <= TOL[torch.bfloat16], errs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["rank16_fp32_lora_on_fp16", "rank128_no_bias", "4d_noncontig"])
def test_layouts_ranks_and_mixed_dtypes(monkeypatch, path, case):
    _set_path(monkeypatch, path)
    if case == "rank16_fp32_lora_on_fp16":  # the memory plan: frozen fp16, LoRA weights fp32
        errs = _run(*_make((4, 9), 64, 72, 16), 2.0, 3, torch.float16, lora_dtype=torch.float32)
        assert max(errs) <= TOL[torch.float16], errs
    elif case == "rank128_no_bias":
        errs = _run(*_make((2, 5), 33, 40, 128, bias=False), 0.25, 1, torch.float32)
        assert max(errs) <= TOL[torch.float32], errs
    else:  # [B, C, H, W] conv features seen as [B, H, W, C]: a permuted, non-contiguous view
        x, W, b, A, B = _make((2, 3, 5), 24, 20, 4)
        view = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
        assert not view.is_contiguous()
        errs = _run(x, W, b, A, B, 0.5, 1, torch.float32, x_view=view)
        assert max(errs) <= TOL[torch.float32], errs


@pytest.mark.parametrize("path", PATHS)
def test_base_rows_are_the_frozen_layer_and_give_lora_no_gradient(monkeypatch, path):
    _set_path(monkeypatch, path)
    x, W, b, A, B = (t.float().to(_device()) if t is not None else t for t in _make((4, 11), 40, 56, 8))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    y = lora_linear(x, W, b, A, B, 1.0, 2)
    frozen = F.linear(x.detach(), W, b)
    torch.testing.assert_close(y[2:], frozen[2:], rtol=1e-5, atol=1e-5)
    assert (y[:2] - frozen[:2]).abs().max() > 0.1  # adapter rows do carry the delta
    dy = torch.randn_like(y)
    y[2:].backward(dy[2:])  # a loss on the base rows only
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0
    torch.testing.assert_close(x.grad[2:], dy[2:] @ W, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(x.grad[:2]) == 0


def test_poisoned_outputs_are_fully_written(monkeypatch):
    """Every kernel buffer starts as NaN; any element a kernel fails to write stays NaN."""
    _set_path(monkeypatch, "triton")
    monkeypatch.setattr(ll, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))
    x, W, b, A, B = (t.float().to(_device()) for t in _make((3, 37), 77, 130, 3))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    y = lora_linear(x, W, b, A, B, 0.5, 2)
    y.backward(torch.ones_like(y))
    for t in (y, x.grad, A.grad, B.grad):
        assert torch.isfinite(t).all()
    errs = _run(*_make((3, 37), 77, 130, 3), 0.5, 2, torch.float32)
    assert max(errs) <= TOL[torch.float32]


@pytest.mark.parametrize("splits", [1, 3])
def test_weight_grad_row_splits(monkeypatch, splits):
    monkeypatch.setattr(ll, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device))
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(101, 5, generator=g), torch.randn(101, 70, generator=g)
    got = ll.lora_weight_grad(u.to(_device()), v.to(_device()), 0.5, splits=splits)
    torch.testing.assert_close(got.cpu(), 0.5 * u.double().t() @ v.double(), rtol=0, atol=1e-4, check_dtype=False)


@pytest.mark.parametrize("path", PATHS)
def test_dropout_on_lora_branch(monkeypatch, path):
    """Same RNG state: our op and the oracle see the same dropout mask on the LoRA input."""
    _set_path(monkeypatch, path)
    # On a GPU machine the interpreter is off, so the Triton path needs CUDA tensors.
    x, W, b, A, B = (t.float().to(_device()) for t in _make((3, 7), 24, 32, 4))
    rows, p, scale = 2, 0.4, 0.8
    ours = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(5)
    y = lora_linear(ours[0], W, b, ours[1], ours[2], scale, rows, dropout_p=p)
    theirs = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.manual_seed(5)
    lora_x = F.dropout(theirs[0][:rows].reshape(-1, 24), p=p).reshape(rows, 7, 24)
    yr = lora_linear_reference(theirs[0], W, b, theirs[1], theirs[2], scale, rows, lora_x=lora_x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)
    # eval mode (training=False) is the plain op
    y_eval = lora_linear(x, W, b, A, B, scale, rows, dropout_p=p, training=False)
    torch.testing.assert_close(y_eval, lora_linear_reference(x, W, b, A, B, scale, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(CUDA, reason="the switch routes CPU tensors, which need the interpreter, off on a GPU machine")
def test_env_var_is_read_at_call_time(monkeypatch):
    calls = []
    real = ll.lowrank
    monkeypatch.setattr(ll, "lowrank", lambda *a: calls.append(1) or real(*a))
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 16, 2))
    monkeypatch.setenv(ll.FORCE_TRITON_ENV, "0")
    y_ref = lora_linear(x, W, b, A, B, 1.0)
    assert calls == []
    monkeypatch.setenv(ll.FORCE_TRITON_ENV, "1")
    y_tri = lora_linear(x, W, b, A, B, 1.0)
    assert calls == [1]
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)


def test_forcing_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv(ll.FORCE_TRITON_ENV, "1")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 16, 2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lora_linear(x, W, b, A, B, 1.0)


def _bad(**over):
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 24, 4))
    args = {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B, "scale": 1.0, "adapter_rows": None}
    args.update(over)
    return args


@pytest.mark.parametrize("over, match", [
    ({"lora_A": torch.randn(4, 15)}, "lora_A must be"),
    ({"lora_B": torch.randn(24, 5)}, "lora_B must be"),
    ({"lora_A": torch.randn(129, 16), "lora_B": torch.randn(24, 129)}, "1 <= r <= 128"),
    ({"weight": torch.randn(24, 17)}, "weight must be"),
    ({"bias": torch.randn(23)}, "bias must be"),
    ({"adapter_rows": 3}, "adapter_rows must be in 0..2"),
    ({"adapter_rows": -1}, "adapter_rows must be in 0..2"),
    ({"x": torch.randn(16)}, r"x must be \[batch"),
    ({"x": torch.ones(2, 3, 16, dtype=torch.int32)}, "share a dtype"),
    ({"weight": torch.randn(24, 16, dtype=torch.float64)}, "share a dtype"),
    ({"lora_B": torch.randn(24, 4, dtype=torch.float16)}, "lora_A and lora_B"),
    ({"weight": torch.randn(24, 16, requires_grad=True)}, "frozen"),
    ({"scale": math.inf}, "scale must be finite"),
])
def test_input_errors(over, match):
    with pytest.raises(ValueError, match=match):
        lora_linear(**_bad(**over))


def test_launcher_errors():
    x = torch.randn(8, 16)
    with pytest.raises(ValueError, match="rank must be in 1..128"):
        ll.lowrank(x, torch.randn(16, 129))
    with pytest.raises(ValueError, match="S must be float32"):
        ll.fused_lora_xw_sb(x, torch.randn(16, 8), None, torch.randn(4, 2).half(), torch.randn(2, 8), 4, 1.0)
    with pytest.raises(ValueError, match="rows must be in 0..8"):
        ll.fused_lora_xw_sb(x, torch.randn(16, 8), None, torch.randn(9, 2), torch.randn(2, 8), 9, 1.0)
    with pytest.raises(ValueError, match="expected U"):
        ll.lora_weight_grad(torch.randn(8, 2), torch.randn(7, 3), 1.0)


@pytest.mark.parametrize("rows", [1, None])
def test_torch_compile_traces_without_graph_break(rows):
    x, W, b, A, B = (t.float() for t in _make((2, 5), 16, 24, 4))

    def step(x, A, B):
        return lora_linear(x, W, b, A, B, 0.5, rows).sin().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # graph break -> error
    grads = []
    for fn in (compiled, step):
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        loss = fn(*leaves)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in leaves])
    for c, e in zip(*grads):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_flop_counter_counts_forward_and_backward():
    from torch.utils.flop_counter import FlopCounterMode

    M, K, N, r, Ma = 3 * 7, 16, 24, 4, 2 * 7
    x, W, b, A, B = (t.float() for t in _make((3, 7), K, N, r))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        lora_linear(x, W, b, A, B, 0.5, 2).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    fwd = 2 * M * K * N + 2 * Ma * K * r + 2 * Ma * r * N
    bwd = 2 * M * N * K + 2 * Ma * r * K + 2 * Ma * N * r * 2 + 2 * Ma * r * K
    assert counts == {"cat_engine.lora_linear_fwd": fwd, "cat_engine.lora_linear_bwd": bwd}


def test_meta_tensors_give_shapes_without_compute():
    """FLOP counting of full-size configs runs on the meta device (docs/design.md §7)."""
    meta = lambda *s, grad=False: torch.empty(*s, device="meta", requires_grad=grad)  # noqa: E731
    x, A, B = meta(2, 9, 16, grad=True), meta(4, 16, grad=True), meta(24, 4, grad=True)
    y = lora_linear(x, meta(24, 16), meta(24), A, B, 0.5, 1)
    assert y.shape == (2, 9, 24) and y.device.type == "meta"
    y.backward(torch.empty_like(y))
    assert x.grad.shape == x.shape and A.grad.shape == A.shape and B.grad.shape == B.shape


def test_emulated_autocast_makes_the_op_cast_as_under_autocast():
    """The VRAM estimator's meta run: meta tensors have no autocast, so it is emulated (engine/vram.py)."""
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    args = (meta(2, 9, 16), meta(24, 16), meta(24), meta(4, 16), meta(24, 4), 0.5, 1)
    assert ll.autocast_dtype("meta") is None and lora_linear(*args).dtype == torch.float32
    with ll.emulated_autocast("meta", torch.bfloat16):
        assert ll.autocast_dtype("meta") == torch.bfloat16 and ll.autocast_dtype("cpu") is None
        assert lora_linear(*args).dtype == torch.bfloat16  # x, W, b cast; the LoRA weights stay fp32
        with ll.emulated_autocast("meta", None):  # nests, and None means no autocast there
            assert ll.autocast_dtype("meta") is None
        assert ll.autocast_dtype("meta") == torch.bfloat16
    assert ll.autocast_dtype("meta") is None
    with pytest.raises(ValueError, match="has autocast of its own"):
        with ll.emulated_autocast("cpu", torch.bfloat16):
            pass


def test_force_triton_zero_takes_the_pytorch_path_for_every_tensor(monkeypatch):
    monkeypatch.setenv(ll.FORCE_TRITON_ENV, "0")
    x = torch.zeros(2, 3, 8, device=_device())
    assert not ll._use_triton(x)
    monkeypatch.delenv(ll.FORCE_TRITON_ENV)
    assert ll._use_triton(x) == (x.is_cuda and ll._triton_installed())
