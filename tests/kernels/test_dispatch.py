"""Measured dispatch of the LoRA paths: the choice, the cache file, its failures, concurrent writers."""

import importlib
import json
import multiprocessing
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cat_engine.kernels import dispatch, lora_linear

ll = importlib.import_module("cat_engine.kernels.lora_linear")
CUDA = torch.cuda.is_available()


class Measure:
    """A stand-in for timing the paths: returns the injected seconds and counts its calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self):
        self.calls += 1
        return dict(self.seconds)


def choose(d, key, measure):
    return d.choose(key, describe=lambda: f"dev|{key}", measure=measure)


@pytest.mark.parametrize(
    "seconds, path",
    [
        ({"torch": 1.0, "triton": 0.5}, "triton"),
        ({"torch": 1.0, "triton": 0.99}, "torch"),  # within the margin: noise, the simpler path
        ({"torch": 1.0, "triton": 1.5}, "torch"),
        ({"torch": float("inf"), "triton": 2.0}, "triton"),  # the torch path failed to run
        ({"torch": 1.0, "triton": float("inf")}, "torch"),
        ({"torch": float("inf"), "triton": float("inf")}, "torch"),
    ],
)
def test_fastest_path_with_injected_timings(seconds, path):
    assert dispatch.fastest(seconds) == path


def test_a_shape_is_measured_once_then_read_from_memory_and_from_the_file(tmp_path):
    file = tmp_path / dispatch.CACHE_FILE
    first = dispatch.Dispatcher(dispatch.PathCache(file))
    fast_triton = Measure({"torch": 2.0, "triton": 1.0})
    assert choose(first, (1, 2), fast_triton) == "triton"
    assert choose(first, (1, 2), fast_triton) == "triton"
    assert fast_triton.calls == 1
    assert choose(first, (3, 4), Measure({"torch": 1.0, "triton": 2.0})) == "torch"
    saved = json.loads(file.read_text())
    assert saved["format"] == dispatch.FORMAT
    assert saved["entries"]["dev|(1, 2)"] == {"path": "triton", "seconds": {"torch": 2.0, "triton": 1.0}}
    assert saved["entries"]["dev|(3, 4)"]["path"] == "torch"

    second = dispatch.Dispatcher(dispatch.PathCache(file))  # a second run: no measurement
    never = Measure({"torch": 9.0, "triton": 9.0})
    assert choose(second, (1, 2), never) == "triton" and choose(second, (3, 4), never) == "torch"
    assert never.calls == 0


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"format": 1, "entries": 5}', '{"format": 1, "entries": {"k": {"path": "x"}}}'],
)
def test_a_broken_cache_file_is_ignored_with_a_warning_then_replaced(tmp_path, content):
    file = tmp_path / dispatch.CACHE_FILE
    file.write_text(content)
    d = dispatch.Dispatcher(dispatch.PathCache(file))
    measure = Measure({"torch": 1.0, "triton": 0.1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert choose(d, (5,), measure) == "triton"
    messages = [str(w.message) for w in caught]
    if content.startswith('{"format": 1, "entries": {'):  # parses; the bad entry is dropped silently
        assert not messages
    else:
        assert len(messages) == 1 and "not a valid LoRA path cache" in messages[0], messages
    assert measure.calls == 1
    assert json.loads(file.read_text())["entries"]["dev|(5,)"]["path"] == "triton"


def test_another_format_is_ignored(tmp_path):
    file = tmp_path / dispatch.CACHE_FILE
    file.write_text(json.dumps({"format": 99, "entries": {"dev|(5,)": {"path": "triton"}}}))
    measure = Measure({"torch": 1.0, "triton": 2.0})
    assert choose(dispatch.Dispatcher(dispatch.PathCache(file)), (5,), measure) == "torch"
    assert measure.calls == 1


def test_an_unwritable_cache_folder_warns_once_and_keeps_the_choice_in_memory(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    d = dispatch.Dispatcher(dispatch.PathCache(blocker / dispatch.CACHE_FILE))
    with pytest.warns(UserWarning, match="cannot write the LoRA path cache"):
        assert choose(d, (1,), Measure({"torch": 1.0, "triton": 0.5})) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(d, (2,), Measure({"torch": 1.0, "triton": 0.5})) == "triton"  # no second warning
    assert choose(d, (1,), Measure({"torch": 0.0, "triton": 9.0})) == "triton"  # from memory


def test_the_cache_file_lives_in_cat_engine_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path))
    assert dispatch.cache_file() == tmp_path / dispatch.CACHE_FILE
    monkeypatch.delenv(dispatch.CACHE_ENV)
    assert dispatch.cache_file() == dispatch.Path.home() / ".cache" / "cat-engine" / dispatch.CACHE_FILE


class _Quiet(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_no_measurement_inside_a_dispatch_mode_or_saved_tensor_hooks(tmp_path):
    """A counter or a memory meter must not see the measurement's own work: such a call takes the
    torch path, remembers nothing, and a later plain call measures."""
    d = dispatch.Dispatcher(dispatch.PathCache(tmp_path / dispatch.CACHE_FILE))
    measure = Measure({"torch": 1.0, "triton": 0.1})
    with _Quiet():
        assert not dispatch.measuring_allowed()
        assert choose(d, (1,), measure) == "torch"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert choose(d, (1,), measure) == "torch"
    assert measure.calls == 0 and not d.memory
    assert dispatch.measuring_allowed()
    assert choose(d, (1,), measure) == "triton" and measure.calls == 1


def _write_many(file, worker, count):
    cache = dispatch.PathCache(file)
    for i in range(count):
        cache.put(f"w{worker}-{i}", "torch" if i % 2 else "triton", {"torch": 1.0, "triton": float(i)})


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_writers_keep_every_entry_and_a_valid_file(tmp_path):
    file = tmp_path / dispatch.CACHE_FILE
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_write_many, args=(file, w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert all(p.exitcode == 0 for p in workers)
    entries = json.loads(file.read_text())["entries"]
    assert sorted(entries) == sorted(f"w{w}-{i}" for w in range(4) for i in range(15))
    assert entries["w2-3"]["path"] == "torch" and entries["w2-4"]["path"] == "triton"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temporary file left


def test_a_cpu_call_under_auto_takes_the_torch_path_without_timing(monkeypatch):
    monkeypatch.delenv(dispatch.PATH_ENV, raising=False)

    def no_timing(*a, **k):
        raise AssertionError("the CPU path must not be measured")

    monkeypatch.setattr(dispatch.DISPATCHER, "choose", no_timing)
    monkeypatch.setattr(ll, "triton_lora_linear", no_timing)
    x, W, A, B = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    torch.testing.assert_close(lora_linear(x, W, None, A, B, 1.0), x @ W.t() + x @ A.t() @ B.t())


@pytest.mark.skipif(not CUDA, reason="the measurement times CUDA kernels")
def test_first_cuda_call_measures_both_paths_and_a_new_run_reads_the_file(monkeypatch, tmp_path):
    monkeypatch.delenv(dispatch.PATH_ENV, raising=False)
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 320, generator=g).cuda().half().requires_grad_()
    W = (torch.randn(640, 320, generator=g) / 18).cuda().half()
    A = (torch.randn(16, 320, generator=g) / 18).cuda().requires_grad_()
    B = torch.randn(640, 16, generator=g).cuda().requires_grad_()
    lora_linear(x, W, None, A, B, 1.0).float().sum().backward()
    entries = json.loads((tmp_path / dispatch.CACHE_FILE).read_text())["entries"]
    ((key, entry),) = entries.items()
    assert torch.cuda.get_device_name() in key and "M=512 K=320 N=640 r=16" in key
    assert entry["path"] in dispatch.PATHS and set(entry["seconds"]) == set(dispatch.PATHS)
    assert all(s is None or s > 0 for s in entry["seconds"].values())
    monkeypatch.setattr(dispatch, "DISPATCHER", dispatch.Dispatcher())
    monkeypatch.setattr(ll, "_measure", lambda *a: pytest.fail("measured again"))
    lora_linear(x, W, None, A, B, 1.0)
