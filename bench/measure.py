"""What the bench measures, one helper each: step time, FLOPs, bytes saved for backward, memory, MFU.

docs/design.md §7. Everything here is independent of the variants being measured: a step is any
zero-argument callable.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, device: torch.device) -> float:
    """Wall time of one call of ``step`` in seconds, with the device synchronized on both sides."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


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


def _storage_key(t: torch.Tensor):
    """(key, bytes) of the memory a tensor keeps alive: its whole storage, shared by its views."""
    try:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses, fakes)
        return ("id", id(t)), t.numel() * t.element_size()


class SavedTensorsMeter:
    """Bytes of tensors saved for backward while active, deduplicated by storage, parameters excluded.

    Use as a context manager around a forward pass (the graph must stay alive inside it):

        meter = SavedTensorsMeter(exclude=model.parameters())
        with meter:
            loss = model(x).sum()
        meter.bytes

    Gradient checkpointing (PyTorch's non-reentrant form) keeps each checkpointed block's inputs
    outside saved-tensor hooks; pass ``meter.checkpoint_func`` as diffusers'
    ``gradient_checkpointing_func`` so those inputs are counted too. It is otherwise the default
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.
    """

    def __init__(self, exclude=()):
        self.excluded = {_storage_key(p)[0] for p in exclude}
        self.seen: dict = {}
        self.active = False
        self._hooks = None

    def exclude(self, tensors) -> None:
        self.excluded.update(_storage_key(t)[0] for t in tensors)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def note(self, t) -> None:
        if self.active and isinstance(t, torch.Tensor):
            key, nbytes = _storage_key(t)
            if key not in self.excluded:
                self.seen[key] = nbytes

    def _pack(self, t):
        self.note(t)
        return t

    def __enter__(self) -> SavedTensorsMeter:
        self.seen = {}
        self.active = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self.active = False

    def checkpoint_func(self, module, *args):
        for a in args:
            self.note(a)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


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
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = _nvml_handle(pynvml, device)
            self._nvml = pynvml
        except Exception as exc:  # NVML missing or not permitted: report None, keep measuring
            self.nvml_error = f"{type(exc).__name__}: {exc}"

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

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
    for _ in range(3):
        a @ b
    best = min(time_step(lambda: a @ b, device) for _ in range(iters))
    return 2 * n**3 / best
