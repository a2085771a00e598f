"""lora_linear against a float64 oracle, through both paths: the cuBLAS-first torch path and the
Triton path.

On CPU the Triton code runs under TRITON_INTERPRET=1 (set in conftest.py) when
CAT_ENGINE_LORA_PATH=triton. The interpreter is slow, so shapes are small and odd rather than many.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cat_engine.kernels import dispatch, lora_linear
from cat_engine.kernels.reference import lora_linear_reference

# The package exports the function under the submodule's name, so fetch the module itself.
ll = importlib.import_module("cat_engine.kernels.lora_linear")
lt = importlib.import_module("cat_engine.kernels.lora_triton")

CUDA = torch.cuda.is_available()
# Max error over max |reference|, per dtype: a few units of the dtype's rounding at these sizes.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
PATHS = ["torch", "triton"]


def _set_path(monkeypatch, path):
    monkeypatch.setenv(dispatch.PATH_ENV, path)


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
    """Our op in ``dtype`` vs the float64 oracle: relative errors of y, dx, dA, dB.

    A LoRA gradient our op leaves as None (no adapter row) must be zero in the oracle.
    """
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
    refs = (
        yr,
        xr.grad,
        Ar.grad if Ar.grad is not None else zero(A),
        Br.grad if Br.grad is not None else zero(B),
    )
    outs = [y, xs.grad, As.grad, Bs.grad]
    for i in (2, 3):
        if outs[i] is None:
            assert refs[i].abs().max() == 0, "a LoRA gradient is missing where the oracle has one"
            outs[i] = torch.zeros_like(refs[i], dtype=lora_dtype)
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
        pytest.skip(
            "bf16 Triton is checked on GPU (the interpreter's bf16 tl.dot is wrong, docs/design.md §5)"
        )
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


def _nan_buffers(monkeypatch):
    monkeypatch.setattr(
        lt, "_empty", lambda shape, dtype, device: torch.full(shape, math.nan, dtype=dtype, device=device)
    )


def test_poisoned_outputs_are_fully_written(monkeypatch):
    """Every Triton buffer starts as NaN; any element a kernel fails to write stays NaN."""
    _set_path(monkeypatch, "triton")
    _nan_buffers(monkeypatch)
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


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_fused_weight_grads_over_row_splits(monkeypatch, splits):
    """dB and dA from one launch, partial sums over row splits (8 splits of 101 rows: some empty)."""
    _nan_buffers(monkeypatch)
    g = torch.Generator().manual_seed(3)
    dy_a, xa = torch.randn(101, 70, generator=g), torch.randn(101, 45, generator=g)
    t, u = torch.randn(101, 5, generator=g), torch.randn(101, 5, generator=g)
    d_b, d_a = lt.weight_grads(*(v.to(_device()) for v in (dy_a, t, xa, u)), 0.5, splits=splits)
    assert d_b.shape == (70, 5) and d_a.shape == (5, 45)
    torch.testing.assert_close(
        d_b.cpu(), 0.5 * dy_a.double().t() @ t.double(), rtol=0, atol=1e-4, check_dtype=False
    )
    torch.testing.assert_close(
        d_a.cpu(), 0.5 * u.double().t() @ xa.double(), rtol=0, atol=1e-4, check_dtype=False
    )


def test_expand_adds_in_place_into_a_row_view(monkeypatch):
    """y[:rows] += scale * t Bᵀ touches the view's rows only; rows past it are left bit for bit."""
    g = torch.Generator().manual_seed(4)
    y = torch.randn(9, 40, generator=g).to(_device())
    before = y.clone()
    s, lo = torch.randn(5, 3, generator=g).to(_device()), torch.randn(3, 40, generator=g).to(_device())
    out = lt.expand(s, lo, 0.25, out=y[:5])
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y[:5], before[:5] + 0.25 * s @ lo, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[5:], before[5:])


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
    lora_x = F.dropout(theirs[0][:rows], p=p)
    yr = lora_linear_reference(theirs[0], W, b, theirs[1], theirs[2], scale, rows, lora_x=lora_x)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    yr.backward(dy)
    for a, r in zip(ours, theirs):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-5)
    # eval mode (training=False) is the plain op
    y_eval = lora_linear(x, W, b, A, B, scale, rows, dropout_p=p, training=False)
    torch.testing.assert_close(
        y_eval, lora_linear_reference(x, W, b, A, B, scale, rows), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(
    CUDA, reason="the switch routes CPU tensors, which need the interpreter, off on a GPU machine"
)
def test_env_var_is_read_at_call_time(monkeypatch):
    calls = []
    real = ll.triton_lora_linear
    monkeypatch.setattr(ll, "triton_lora_linear", lambda *a: calls.append(1) or real(*a))
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 16, 2))
    monkeypatch.setenv(dispatch.PATH_ENV, "torch")
    y_torch = lora_linear(x, W, b, A, B, 1.0)
    monkeypatch.setenv(dispatch.PATH_ENV, "auto")
    y_auto = lora_linear(x, W, b, A, B, 1.0)  # on CPU: the torch path, not timed
    assert calls == []
    monkeypatch.setenv(dispatch.PATH_ENV, "triton")
    y_tri = lora_linear(x, W, b, A, B, 1.0)
    assert calls == [1]
    torch.testing.assert_close(y_tri, y_torch, rtol=1e-5, atol=1e-5)
    assert torch.equal(y_auto, y_torch)


def test_a_bad_path_setting_is_named(monkeypatch):
    monkeypatch.setenv(dispatch.PATH_ENV, "cublas")
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 16, 2))
    with pytest.raises(ValueError, match="CAT_ENGINE_LORA_PATH='cublas': expected auto, torch or triton"):
        lora_linear(x, W, b, A, B, 1.0)


def test_forcing_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    _set_path(monkeypatch, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 16, 2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        lora_linear(x, W, b, A, B, 1.0)


def _bad(**over):
    x, W, b, A, B = (t.float() for t in _make((2, 3), 16, 24, 4))
    args = {"x": x, "weight": W, "bias": b, "lora_A": A, "lora_B": B, "scale": 1.0, "adapter_rows": None}
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, match",
    [
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
        ({"lora_A": torch.randn(4, 16, device="meta")}, "one device"),
    ],
)
def test_input_errors(over, match):
    with pytest.raises(ValueError, match=match):
        lora_linear(**_bad(**over))


def test_launcher_errors():
    x = torch.randn(8, 16)
    with pytest.raises(ValueError, match="rank must be in 1..128"):
        lt.shrink(x, torch.randn(16, 129))
    with pytest.raises(ValueError, match="S must be float32"):
        lt.expand(torch.randn(4, 2).half(), torch.randn(2, 8), 1.0)
    with pytest.raises(ValueError, match="out must be"):
        lt.expand(torch.randn(4, 2), torch.randn(2, 8), 1.0, out=torch.randn(5, 8))
    with pytest.raises(ValueError, match="expected dy_a"):
        lt.weight_grads(torch.randn(8, 2), torch.randn(7, 3), torch.randn(8, 4), torch.randn(8, 3), 1.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, None])
def test_torch_compile_traces_without_graph_break(monkeypatch, path, rows):
    _set_path(monkeypatch, path)
    x, W, b, A, B = (t.float().to(_device()) for t in _make((2, 5), 16, 24, 4))

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
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_flop_counter_counts_forward_and_backward(monkeypatch, path):
    """The torch path is counted through its ATen products, the Triton path through the custom
    ops' formulas: the same totals."""
    from torch.utils.flop_counter import FlopCounterMode

    _set_path(monkeypatch, path)
    M, K, N, r, Ma = 3 * 7, 16, 24, 4, 2 * 7
    x, W, b, A, B = (t.float().to(_device()) for t in _make((3, 7), K, N, r))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        lora_linear(x, W, b, A, B, 0.5, 2).sum().backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    fwd = 2 * M * K * N + 2 * Ma * K * r + 2 * Ma * r * N
    bwd = 2 * M * N * K + 2 * Ma * r * K + 2 * Ma * N * r * 2 + 2 * Ma * r * K
    if path == "triton":
        assert counts == {"cat_engine.lora_linear_fwd": fwd, "cat_engine.lora_linear_bwd": bwd}
    else:
        assert sum(counts.values()) == fwd + bwd and set(counts) <= {"aten.mm", "aten.addmm", "aten.addmm_"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket).removeprefix("aten."))
        return func(*args, **(kwargs or {}))


def test_torch_path_adds_the_delta_in_place_and_copies_nothing(monkeypatch):
    """The ATen ops of the torch path, forward and backward: cuBLAS products, the delta accumulated
    into the adapter-rows view (addmm_), views; no copy of the base rows, no second output buffer."""
    _set_path(monkeypatch, "torch")
    x, W, b, A, B = (t.float() for t in _make((3, 7), 16, 24, 4))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    with _Ops() as fwd:
        y = lora_linear(x, W, b, A, B, 0.5, 2)
    with _Ops() as bwd:
        y.backward(torch.ones_like(y))
    views = {"view", "t", "slice", "detach", "_unsafe_view"}
    assert [n for n in fwd.names if n not in views] == ["addmm", "mm", "addmm_"]
    assert sorted(n for n in bwd.names if n not in views and n not in ("ones_like",)) == sorted(
        ["mm", "mm", "addmm_", "addmm", "addmm"]
    )


def test_torch_path_saves_only_the_adapter_rows_input_and_the_low_rank_product():
    x, W, b, A, B = (t.float() for t in _make((3, 7), 16, 24, 4))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, W, b, A, B, 0.5, 2)
    params = {W.data_ptr(), A.data_ptr(), B.data_ptr()}
    others = [t for t in saved if t.data_ptr() not in params]
    x_a, t = sorted(others, key=lambda v: v.shape[1], reverse=True)
    assert x_a.shape == (14, 16) and t.shape == (14, 4)  # the 2 adapter rows of x, and t = x_a Aᵀ
    assert x_a.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()  # a view, not a copy


def test_autocast_casts_as_f_linear_and_keeps_lora_gradients_fp32():
    """CPU autocast bf16 (the memory plan's case): output bf16 like F.linear's, LoRA gradients in
    the LoRA weights' fp32, values within bf16 rounding of the oracle."""
    x, W, b, A, B = _make((2, 9), 32, 40, 4)
    xs, As, Bs = x.float().requires_grad_(), A.float().requires_grad_(), B.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(xs, W.bfloat16(), b.bfloat16(), As, Bs, 0.5, 1)
        assert y.dtype == F.linear(xs, W.float()).dtype == torch.bfloat16
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y.backward(dy.bfloat16())
    assert (xs.grad.dtype, As.grad.dtype, Bs.grad.dtype) == (torch.float32,) * 3
    xr, Ar, Br = x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
    yr = lora_linear_reference(xr, W, b, Ar, Br, 0.5, 1)
    yr.backward(dy)
    for got, want in ((y, yr), (xs.grad, xr.grad), (As.grad, Ar.grad), (Bs.grad, Br.grad)):
        assert _rel_err(got.float(), want) <= TOL[torch.bfloat16]


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


@pytest.mark.skipif(not CUDA, reason="autotuning times compiled kernels on a GPU")
def test_autotuned_kernels_on_a_gpu(monkeypatch):
    """With autotuning on, every configuration is tried on the real buffers: the in-place expand
    must come out as if it ran once, and the whole op must still match the oracle."""
    monkeypatch.setenv(lt.AUTOTUNE_ENV, "1")
    _set_path(monkeypatch, "triton")
    g = torch.Generator().manual_seed(6)
    y = torch.randn(300, 256, generator=g).cuda().half()
    before = y.clone()
    s, lo = torch.randn(200, 16, generator=g).cuda(), torch.randn(16, 256, generator=g).cuda().half()
    lt.expand(s, lo, 0.5, out=y[:200])
    want = before[:200].float() + 0.5 * s @ lo.float()
    torch.testing.assert_close(y[:200].float(), want, rtol=1e-2, atol=2e-2)
    assert torch.equal(y[200:], before[200:])
    errs = _run(*_make((4, 300), 320, 640, 16), 1.0, 3, torch.float16)
    assert max(errs) <= TOL[torch.float16], errs
