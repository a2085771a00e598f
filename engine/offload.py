"""Block offloading (docs/design.md §6, §9): a transformer's blocks live in CPU memory and visit the
device one or two at a time.

    offload = BlockOffload(transformer, device)   # the blocks' frozen tensors to (pinned) CPU memory
    ...                                           # train as usual, with gradient checkpointing
    offload.remove()                              # hooks off, every block back on CPU

What moves: the frozen parameters and buffers (quantised or not) of every block the family lists
(``family.block_classes``: the split batch's units). LoRA parameters stay on the device, where the
optimizer updates them; everything outside the blocks (embedders, the final norm and projection)
stays resident.

When: a forward pre-hook on each block puts its device copy in place (waiting for it when it was
prefetched), puts back the CPU tensors of every other block except the one it then starts copying
(the next one, on a side CUDA stream so the copy overlaps this block's compute), and so keeps at
most two blocks on the device. A device copy is freed once nothing refers to it. The hook fires on
every call of a block: the forward, and the checkpoint recompute in backward (the split batch and
diffusers' checkpointing both call the block module). A block is put back when the next block is
fetched, not when its forward ends, because its backward runs after its recompute and reads its
weights (a fused LoRA layer's saved weight, the split batch's skipped tail).

"Next" is the neighbour in the direction the blocks are running: up during the forward, down during
backward's recomputes; a block called twice in a row (the forward's last block, recomputed first in
backward; block 0 starting the next step) turns the direction around.

Gradient checkpointing is required (``MemoryPlan`` refuses offloading without it): without it
autograd keeps every block's weights for backward and nothing would leave the device.

On the meta device (the VRAM planner) and on a CPU device the "move" is a copy on the same device:
the same allocations a GPU run makes (measured by ``engine/vram.py``), and in tests a copy whose
use can be observed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from cat_engine.engine.families import denoiser_family
from cat_engine.engine.quantize import map_plain, plain_tensors, tensor_bytes

_ATTR = "_cat_block_offload"


@dataclass
class _Entry:
    """One frozen tensor of a block: ``module._parameters[name]`` or ``module._buffers[name]``."""

    module: torch.nn.Module
    table: str  # "_parameters" or "_buffers"
    name: str
    home: torch.Tensor  # the CPU (home) tensor, a Parameter for parameters


def offload_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a diffusion transformer that offloading moves, in the order they run."""
    family = denoiser_family(model)
    if family is None:
        raise ValueError("block offloading needs a diffusion transformer (SD3, Flux, Z-Image), not a UNet")
    return [m for m in model.modules() if type(m).__name__ in family.block_classes]


def _frozen_entries(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str, torch.Tensor]]:
    out = []
    for module in block.modules():
        for table in ("_parameters", "_buffers"):
            for name, t in getattr(module, table).items():
                if t is not None and not t.requires_grad:
                    out.append((module, table, name, t))
    return out


def frozen_block_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen tensors that offloading keeps in CPU memory."""
    return sum(tensor_bytes(t) for b in offload_blocks(model) for *_, t in _frozen_entries(b))


def _pinned(t: torch.Tensor) -> torch.Tensor:
    try:
        return t.pin_memory()
    except RuntimeError as exc:  # no CUDA, or the pinned-memory limit: pageable copies work, slower
        warnings.warn(
            f"block offloading: cannot pin host memory ({exc}); copies will be slower", stacklevel=3
        )
        return t


class BlockOffload:
    """Installed on a transformer: its blocks' frozen tensors live at home and are fetched as they run.

    ``device``: where the blocks run. The home is the CPU for a CUDA device; for ``meta`` and
    ``cpu`` the home is the device itself and a fetch is a copy (see the module docstring).
    Installing moves everything else of the model to ``device``.
    """

    def __init__(self, model: torch.nn.Module, device, *, prefetch: bool = True):
        if getattr(model, _ATTR, None) is not None:
            raise ValueError("block offloading is already installed on this model")
        self.device = torch.device(device)
        self.blocks = offload_blocks(model)
        self.prefetch = prefetch
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.entries: list[list[_Entry]] = []
        self.resident: dict[int, list[torch.Tensor]] = {}  # block index -> its device copies, in place
        self.inflight: dict[int, tuple[list[torch.Tensor], object]] = {}  # prefetched: copies, event
        self.last, self.direction = None, 1
        self.fetches = 0  # copies made (a test and a log line read it)
        self._park_at_home(model)
        self.hooks = [b.register_forward_pre_hook(self._before(i)) for i, b in enumerate(self.blocks)]
        object.__setattr__(model, _ATTR, self)
        self.model = model

    # ---- placement ------------------------------------------------------------------------------

    def _park_at_home(self, model) -> None:
        """Blocks' frozen tensors to their home, the rest of the model to the device."""
        remote = self.device.type == "cuda"
        found = [_frozen_entries(b) for b in self.blocks]
        for block in found:  # out of the model while it moves, so that they never reach the device
            for module, table, name, _ in block:
                getattr(module, table)[name] = None
        model.to(self.device)
        for block in found:
            entries = []
            for module, table, name, t in block:
                home = map_plain(t, lambda p: _pinned(p.to("cpu"))) if remote else t
                if table == "_parameters" and not isinstance(home, torch.nn.Parameter):
                    home = torch.nn.Parameter(home, requires_grad=False)
                getattr(module, table)[name] = home
                entries.append(_Entry(module, table, name, home))
            self.entries.append(entries)

    def _copy(self, i: int) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            move = lambda p: p.to(self.device, non_blocking=True)  # noqa: E731
        else:  # same device: a distinct copy, the allocation a move would make
            move = torch.clone
        self.fetches += 1
        return [map_plain(e.home, move) for e in self.entries[i]]

    def _start(self, i: int) -> None:
        """Begin copying block ``i`` (on the side stream on CUDA)."""
        if i in self.resident or i in self.inflight or not 0 <= i < len(self.blocks):
            return
        if self.stream is None:
            self.inflight[i] = (self._copy(i), None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # home tensors are ready
        with torch.cuda.stream(self.stream):
            copies = self._copy(i)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.inflight[i] = (copies, event)

    def _install(self, i: int) -> None:
        if i in self.resident:
            return
        self._start(i)
        copies, event = self.inflight.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in copies:  # made on the side stream, used on this one: the allocator must know
                for leaf in plain_tensors(t):
                    leaf.record_stream(current)
        for e, t in zip(self.entries[i], copies):
            if e.table == "_parameters":
                t = torch.nn.Parameter(t, requires_grad=False)
            getattr(e.module, e.table)[e.name] = t
        self.resident[i] = copies

    def _evict(self, i: int) -> None:
        """Put block ``i``'s home tensors back; its device copies go when nothing refers to them."""
        if self.resident.pop(i, None) is None:
            return
        for e in self.entries[i]:
            getattr(e.module, e.table)[e.name] = e.home

    # ---- the hook -------------------------------------------------------------------------------

    def _before(self, i: int):
        def hook(module, args):
            self.fetch(i)

        return hook

    def fetch(self, i: int) -> None:
        """Block ``i`` is about to run: its copy in place, the next one on its way, the others home."""
        if self.last is not None:
            step = i - self.last
            if step == 0:
                self.direction = -self.direction
            elif abs(step) == 1:
                self.direction = step
        self.last = i
        self._install(i)
        following = i + self.direction
        for j in list(self.resident):
            if j != i:
                self._evict(j)
        for j in list(self.inflight):
            if j != following:
                self.inflight.pop(j)
        if self.prefetch:
            self._start(following)

    def remove(self) -> None:
        """Hooks off, every block's home tensors back in place."""
        for h in self.hooks:
            h.remove()
        for i in list(self.resident):
            self._evict(i)
        self.inflight.clear()
        object.__setattr__(self.model, _ATTR, None)


def block_offload(model) -> BlockOffload | None:
    """The offloading installed on ``model``, if any."""
    return getattr(model, _ATTR, None)
