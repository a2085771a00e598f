"""The whole training step as one CUDA graph, captured once per input shape and replayed
(docs/design.md §5).

At batch 1 a diffusion training step on a large GPU is bound by kernel launches, not by the
kernels: thousands of small launches with gaps between them. A CUDA graph replays the recorded
kernels with one launch. What is captured is the whole step: the forward (the split batch),
backward, gradient clipping and a capturable fused AdamW update. Each step's inputs are copied
into the graph's static buffers first; its outputs (the losses, the gradient norm) are the graph's
static tensors, copied out after the replay.

What capture relies on, and how it is met:

* **No host synchronisation inside the step** (nothing in Python reads a device value): the
  engine's step has none; the split batch's equality checks of small row groups are skipped
  while capturing (``engine/split_unet.py``); the caller checks the loss and the norm for
  finiteness after the replay.
* **Optimizer state that exists before capture**, at fixed addresses: a few eager warm-up steps
  on a side stream create it (and do the once-per-shape work: cuBLAS workspaces, the LoRA path
  measurement, Triton autotuning, the split batch's first recompute); their updates are then
  undone in place (parameters and optimizer state copied back, new state zeroed), so training
  goes on as if they had never run.
* **A learning rate the schedule can change**: inside the graph it is a device tensor, filled from
  the optimizer's ``lr`` before each replay.
* **Undo**: the step copies the adapter and the optimizer state aside before updating them, so a
  step whose loss or gradient norm turns out non-finite is undone (:meth:`GraphedStep.undo`).

:func:`check_cuda_graphs` refuses, in one line, what cannot be captured: no CUDA device, fp16 loss
scaling (the scaler reads the device to skip steps), several ranks, and ``torch.compile`` modes that
capture graphs themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch

from cat_engine.engine.errors import CatEngineError

COMPILE_MODES_WITH_GRAPHS = ("reduce-overhead", "max-autotune")
# Eager steps before capture: the first does the once-per-shape work, the others settle the
# caching allocator (PyTorch's CUDA graph notes ask for a few).
WARMUP_STEPS = 3


class CudaGraphError(CatEngineError):
    """A run that cannot be captured as a CUDA graph; the message says why and what to change."""


def check_cuda_graphs(device, *, world: int = 1, compile_mode=None, precision: str | None = None) -> None:
    """Raise :class:`CudaGraphError` when ``--cuda-graphs`` cannot work for this run."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise CudaGraphError(
            f"--cuda-graphs needs a CUDA device; this run is on {device.type} (drop --cuda-graphs)"
        )
    if world > 1:
        raise CudaGraphError(f"--cuda-graphs runs on one process; this run has {world} ranks (drop --nproc)")
    if compile_mode in COMPILE_MODES_WITH_GRAPHS:
        raise CudaGraphError(
            f"--compile {compile_mode} captures CUDA graphs itself; use it or --cuda-graphs, not both"
        )
    if precision == "fp16":
        raise CudaGraphError(
            "--cuda-graphs cannot capture fp16 loss scaling (the scaler reads the device every step); "
            "use --precision bf16 or fp32"
        )


class CudaGraph:
    """``torch.cuda.CUDAGraph`` and the side stream its warm-up runs on (tests substitute a
    stand-in with the same three methods)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.graph = torch.cuda.CUDAGraph()

    def warm_up(self, fn: Callable[[], object]) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def capture(self, fn: Callable[[], tuple]) -> tuple:
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


def _foreach_copy(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    copy = getattr(torch, "_foreach_copy_", None)
    if copy is not None:
        copy(list(dst), list(src))
    else:  # torch without the multi-tensor copy
        for d, s in zip(dst, src):
            d.copy_(s)


class GraphedStep:
    """One training step, ``compute()`` -> ``(loss, ...)`` then backward, clip, optimizer,
    captured on first call and replayed on every call after.

    ``compute`` must read its inputs from tensors that stay the same objects (static buffers) and
    return a tuple of tensors, the differentiable loss first. A call returns copies of those
    tensors (detached) followed by the gradient norm before clipping. ``optimizer`` must be
    capturable (``make_optimizer(..., capturable=True)``). ``graph``: a factory of the capture
    mechanism (default :class:`CudaGraph` on the parameters' device).
    """

    def __init__(
        self,
        compute: Callable[[], tuple],
        params: Sequence[torch.nn.Parameter],
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        warmup: int = WARMUP_STEPS,
        graph: Callable[[torch.device], object] | None = None,
    ):
        self.compute, self.params, self.optimizer = compute, list(params), optimizer
        self.max_grad_norm = float("inf") if max_grad_norm is None else float(max_grad_norm)
        self.autocast, self.warmup, self._make_graph = autocast, warmup, graph or CudaGraph
        self.device = self.params[0].device
        self._graph = None
        self._outputs: tuple = ()
        self._lrs: list[torch.Tensor] = []
        self._live: list[torch.Tensor] = []
        self._backup: list[torch.Tensor] = []

    # ---- the step that is captured -------------------------------------------------------------
    def _step(self, keep: bool) -> tuple:
        with self.autocast():
            outputs = self.compute()
        outputs[0].backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
        if keep:  # what undo() restores: the adapter and optimizer state before this update
            _foreach_copy(self._backup, self._live)
        self.optimizer.step()
        return (*(o.detach() for o in outputs), norm)

    def _state_tensors(self) -> list[torch.Tensor]:
        return [
            t for p in self.params for t in self.optimizer.state.get(p, {}).values() if torch.is_tensor(t)
        ]

    def _capture(self) -> None:
        graph = self._make_graph(self.device)
        for g in self.optimizer.param_groups:  # a resumed optimizer has its saved flags
            if "capturable" in g and self.device.type == "cuda":
                g["capturable"] = True
        with torch.no_grad():
            before = {id(t): t.clone() for t in [*self.params, *self._state_tensors()]}

        def warm_steps():
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self._step(keep=False)

        graph.warm_up(warm_steps)
        # Undo the warm-up: everything back to its values before, state it created to zero.
        self._live = [*self.params, *self._state_tensors()]
        with torch.no_grad():
            for t in self._live:
                if id(t) in before:
                    t.copy_(before[id(t)])
                else:
                    t.zero_()
            self._backup = [t.clone() for t in self._live]
        self.optimizer.zero_grad(set_to_none=True)
        groups = self.optimizer.param_groups
        self._lrs = [torch.tensor(float(g["lr"]), device=self.device, dtype=torch.float32) for g in groups]
        floats = [g["lr"] for g in groups]
        try:
            for g, lr in zip(groups, self._lrs):
                g["lr"] = lr
            self._outputs = graph.capture(lambda: self._step(keep=True))
        except RuntimeError as exc:
            raise CudaGraphError(f"--cuda-graphs: capturing the training step failed ({exc})") from exc
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        self._graph = graph

    # ---- per step ---------------------------------------------------------------------------------
    def __call__(self) -> tuple:
        if self._graph is None:
            self._capture()
        for g, lr in zip(self.optimizer.param_groups, self._lrs):
            lr.fill_(float(g["lr"]))
        self._graph.replay()
        return tuple(o.clone() for o in self._outputs)

    def undo(self) -> None:
        """Put back the adapter and optimizer state from before the last replayed update."""
        if self._live:
            with torch.no_grad():
                _foreach_copy(self._live, self._backup)


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor of a dataclass / dict / tensor, in a stable order."""
    if torch.is_tensor(obj):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _tensors(getattr(obj, f.name))]
    if isinstance(obj, dict):
        return [t for k in sorted(obj) for t in _tensors(obj[k])]
    return []


class GraphedTrainStep:
    """``step_fn(batch)`` as graphed steps: one :class:`GraphedStep` per shape of the batch, whose
    static buffers each batch of that shape is copied into. Same arguments as :class:`GraphedStep`.
    """

    def __init__(self, step_fn: Callable[[object], tuple], params, optimizer, **kwargs):
        self.step_fn, self.params, self.optimizer, self.kwargs = step_fn, list(params), optimizer, kwargs
        self.graphs: dict[tuple, tuple[object, GraphedStep]] = {}
        self._last: GraphedStep | None = None

    def __call__(self, batch) -> tuple:
        key = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in _tensors(batch))
        if key not in self.graphs:
            static = _clone(batch)
            step = GraphedStep(lambda: self.step_fn(static), self.params, self.optimizer, **self.kwargs)
            self.graphs[key] = (static, step)
        static, step = self.graphs[key]
        _foreach_copy(_tensors(static), _tensors(batch))
        self._last = step
        return step()

    def undo(self) -> None:
        if self._last is not None:
            self._last.undo()


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(
            obj, **{f.name: _clone(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        )
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj
