"""What the bench scripts measure, one tool each: step time, FLOPs, bytes saved for backward, CUDA memory.

docs/design.md §7. Everything here is independent of what is measured: a step is any zero-argument
callable.

* Time: :func:`time_interleaved`, the one timer: steps run round-robin with the first one rotating
  each round, one torch thread on a CPU, the device synchronized (or CUDA events) around each call;
  :class:`Spread` gives the median and the spread of the times.
* FLOPs: :func:`count_flops`, ``torch.utils.flop_counter.FlopCounterMode`` (works on meta tensors).
* Dispatched ops: :func:`count_ops`, every ATen op that reaches the kernels below autograd (a
  ``TorchDispatchMode``): the host work of a step, one unit per op, deterministic.
* Saved bytes: :class:`SavedTensorsMeter`, every tensor autograd packs for backward
  (``torch.autograd.graph.saved_tensors_hooks``), plus the inputs gradient checkpointing keeps alive
  for its recompute (:func:`counting_checkpoint`); counted once per storage by the storage's full
  size (a saved view keeps its whole base alive), the excluded tensors (parameters) left out.
* CUDA memory: :class:`CudaMemory`, ``torch.cuda.max_memory_allocated`` and NVML.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

CLOCKS = ("wall", "cpu", "cuda_events")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to ``threads`` inside the block (``None``: left alone)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_once(step: Callable[[], object], device: torch.device, clock: str) -> float:
    if clock == "cuda_events":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    timer = time.process_time if clock == "cpu" else time.perf_counter
    _synchronize(device)
    start = timer()
    step()
    _synchronize(device)
    return timer() - start


def time_interleaved(
    steps: Mapping[str, Callable[[], object]],
    rounds: int,
    device: torch.device | str = "cpu",
    *,
    warmup: int = 0,
    clock: str = "wall",
    threads: int | None = 1,
    around: Callable[[str], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds of every timed call of every step, by name.

    Each step first runs ``warmup`` untimed calls; then ``rounds`` rounds run every step once,
    the first step rotating each round, so drift in clock speed or in other load on the machine
    hits every step alike (docs/design.md §7: ratios side by side, interleaved).

    ``clock``: ``"wall"`` (``perf_counter``, the device synchronized on both sides: what a step
    costs end to end), ``"cpu"`` (the process's CPU time: with one thread, what the step costs the
    CPU, far less sensitive than wall time to other processes sharing the cores) or
    ``"cuda_events"`` (CUDA events around the call: device time). ``threads``: torch's intra-op
    threads while a CPU runs the steps (``None``: as set). ``around(name)``: a context manager
    entered around each timed call (memory probes), outside the clock's reading.
    """
    device = torch.device(device)
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cuda_events" and device.type != "cuda":
        raise ValueError(f"clock cuda_events needs a CUDA device, got {device}")
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch_threads(threads if device.type == "cpu" else None):
        for name in names:
            for _ in range(warmup):
                steps[name]()
        for r in range(rounds if names else 0):
            first = r % len(names)
            for name in names[first:] + names[:first]:
                with around(name) if around is not None else nullcontext():
                    times[name].append(_time_once(steps[name], device, clock))
    return times


@dataclass
class Spread:
    """Median and spread of a list of step times (seconds)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float

    @classmethod
    def of(cls, times: list[float]) -> Spread:
        if not times:
            raise ValueError("no timed steps")
        if len(times) == 1:
            q1 = q3 = times[0]
        else:
            q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
        return cls(statistics.median(times), q1, q3, min(times), max(times))


def count_flops(fn) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which knows matmuls,
    convolutions and attention (one multiply-add = 2 FLOPs). Elementwise ops, norms and ops
    without a registered formula (custom kernels among them) count zero. Works on meta tensors.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, by name (``aten.mm``, ``aten.view``, ...).

    Ops are counted where they reach the kernels, below autograd: a backward pass counts the ops
    it runs, views and in-place ops count like any other, and an op implemented by others (a
    composite such as ``F.linear``) counts as what it decomposes into. A custom op counts once
    (its implementation runs outside the mode).
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> Counter:
    """The ATen ops ``fn()`` dispatches (forward and, if it calls it, backward), by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


def _storage_key(t: torch.Tensor):
    """(key, bytes) of the memory a tensor keeps alive: its whole storage, shared by its views."""
    try:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses, fakes)
        return ("id", id(t)), t.numel() * t.element_size()


_active_meters: list[SavedTensorsMeter] = []


class SavedTensorsMeter:
    """Bytes of tensors saved for backward while active, deduplicated by storage, ``exclude`` left out.

    Use as a context manager around a forward pass (the graph must stay alive inside it):

        meter = SavedTensorsMeter(exclude=model.parameters())
        with meter:
            loss = model(x).sum()
        meter.bytes

    Gradient checkpointing (PyTorch's non-reentrant form) keeps each checkpointed block's inputs
    outside saved-tensor hooks; give a UNet :func:`counting_checkpoint` as its checkpoint function
    so that every active meter counts those inputs too. Meta tensors have no storage to count.
    """

    def __init__(self, exclude=()):
        self.excluded = {_storage_key(p)[0] for p in exclude}
        self.seen: dict = {}
        self._hooks = None

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def note(self, t) -> None:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key, nbytes = _storage_key(t)
            if key not in self.excluded:
                self.seen[key] = max(self.seen.get(key, 0), nbytes)

    def _pack(self, t):
        self.note(t)
        return t

    def __enter__(self) -> SavedTensorsMeter:
        self.seen = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        _active_meters.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active_meters.remove(self)
        self._hooks.__exit__(*exc)


def counting_checkpoint(module, *args):
    """diffusers' default checkpoint function (torch, non-reentrant), with the inputs it keeps
    alive noted by every active :class:`SavedTensorsMeter`."""
    for meter in _active_meters:
        for a in args:
            meter.note(a)
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def saved_bytes(forward, exclude=()) -> int:
    """Bytes saved for backward by ``forward()`` (called once; its result is dropped)."""
    with SavedTensorsMeter(exclude) as meter:
        out = forward()
    del out
    return meter.bytes


def _nvml_handle(pynvml, device: torch.device):
    """NVML's handle of torch's device, matched by PCI location (torch's index differs from NVML's
    under CUDA_VISIBLE_DEVICES); by index where torch does not expose the PCI location."""
    props = torch.cuda.get_device_properties(device)
    where = tuple(getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device"))
    if None not in where:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            pci = pynvml.nvmlDeviceGetPciInfo(handle)
            if (pci.domain, pci.bus, pci.device) == where:
                return handle
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


class CudaMemory:
    """Peak ``torch.cuda.max_memory_allocated`` per step and NVML's used memory of the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._nvml = None
        self.nvml_error = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, device)
            self._nvml = pynvml
        except Exception as exc:  # NVML missing or not permitted: report None, keep measuring
            self.nvml_error = f"{type(exc).__name__}: {exc}"

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak_allocated(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def nvml_used(self) -> int | None:
        """Device memory in use (all processes, the caching allocator's reserve included)."""
        if self._nvml is None:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


def matmul_flops_per_s(device: torch.device, dtype=torch.bfloat16, n: int = 8192, iters: int = 20) -> float:
    """Best achieved rate of an ``n x n x n`` matmul: the roofline MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_interleaved({"matmul": lambda: a @ b}, iters, device, warmup=3)["matmul"]
    return 2 * n**3 / min(times)
