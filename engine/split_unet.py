"""Split-batch execution of a diffusers UNet: adapter rows in autograd, base rows never (docs/design.md §4).

One UNet call runs ``N`` rows: the first ``adapter_rows`` get the LoRA delta and gradients, the
rest (the frozen base model's rows) are computed but never enter autograd: no activation of a base
row is saved for backward and no backward op runs on one. Every frozen op that needs no gradient
runs all rows together.

How (one call, three kinds of module call; with checkpointing, or ``no_checkpoint="split"``):

* **Units** are the modules diffusers hands to its gradient-checkpointing function
  (``ResnetBlock2D`` and ``BasicTransformerBlock`` in diffusers 0.42; ``Transformer2DModel`` itself is
  not checkpointed, so nothing nests). We install our own function for the call:

  - with gradient checkpointing enabled, :class:`_AdapterRowCheckpoint`: forward under ``no_grad``
    over *all* rows, keep only the adapter rows' inputs, and in backward recompute the unit on the
    adapter rows alone and backprop. The base rows ride along in a forward that runs anyway.
    The recompute skips the frozen Linear/Conv2d calls after a unit's last saved tensor
    (:func:`_skip_tail`), as torch's own checkpoint does, so its FLOPs equal a LoRA step's.
  - without checkpointing and ``no_checkpoint="split"`` (diffusers' flag is switched on for the
    duration of the call only so that the units pass through our function), a row split: base rows
    under ``no_grad``, adapter rows with grad, outputs concatenated. The default without
    checkpointing is two plain calls instead (see below).

* **Glue**: the leaf modules that run between units (the norm, ``proj_in``/``proj_out`` of
  ``Transformer2DModel``, down/up-sampling convs, ``conv_norm_out``/``conv_out``; a LoRA layer that
  is not inside a unit) are row-split the same way: they are cheap, so splitting them costs nothing
  in FLOPs, whereas checkpointing them would add a recompute.

* **Shared rows**: before the first LoRA layer the three groups of a CAT batch (token, plain, base)
  see the same ``z_t`` and ``t``, so ``conv_in``, the time embedding and every LoRA-free unit and glue
  module whose row inputs are known to repeat across groups run once per distinct group and are
  expanded. SD1.5: ``conv_in``, the first resnet and the first norm run on B rows instead of 3B.
  SDXL: the token rows' pooled text differs, so the first ``DownBlock2D`` runs 2B rows instead of 3B.
  Row patterns travel on the tensors produced here; small tensors (the time embedding) are compared
  by value; anything else counts as distinct.

Diffusion transformers (SD3, Flux, Z-Image; ``engine/families/``) run through the same machinery:
their units are the transformer blocks diffusers checkpoints (``JointTransformerBlock``,
``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``, ``ZImageTransformerBlock`` including
the refiners). Their glue is taken whole rather than leaf by leaf (:func:`_glue_modules`): the
patch/text/time embedders and the final AdaLN norm and projection, whose modulation products would
otherwise save the base rows' scales. Every conditioning tensor of a block call is per row (text,
pooled text and time embeddings, masks, Z-Image's per-row rotary table); Flux's rotary table is one
for all rows and reaches the blocks inside a tuple, which passes through as it is, and the module
that makes it from position ids is left out of the glue.

What still sees base rows in backward: elementwise glue between modules (residual adds, the skip
concatenation, nearest up-sampling, reshapes) passes the base rows' zero gradient along. It saves
nothing and does no FLOPs, but it is memory traffic over ``N`` rows.

The LoRA layers must honour ``split_state(unet).adapter_rows``: the fused layers of
``engine/fused_lora.py`` do, and so do layers registered as row-aware (``engine/row_aware.py``); a
UNet with plain peft LoRA layers, a replaced ``forward`` or trainable weights outside those layers is
refused, since its base rows would silently carry the adapter.

LoRA dropout: the checkpoint Function records the RNG state before a unit's forward and replays it
for the recompute, as torch's own checkpoint does; the fused layers draw masks for the adapter rows
only, so the recompute on the adapter rows draws the very masks of the forward over all rows.

Without checkpointing, ``no_checkpoint`` chooses how base rows stay out of autograd:
``two_calls`` (the default: adapter rows with grad, then base rows under ``no_grad``) has the same
FLOPs and saved bytes as ``split``, is as fast on a CPU, and launches fewer, larger kernels on a
GPU (``split`` runs every module twice plus a concatenation). It does not share the pre-LoRA work
(``conv_in`` and the first resnet) between plain and base rows; ``split`` does. ``checkpoint`` is
checkpointing under another name: least memory, one more forward of the adapter rows. With
checkpointing the one-call design above is the only one: the base rows ride in a forward that
runs anyway. The measured overheads, with their commands, are in ``bench/results/`` (docs/design.md §7).
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager, nullcontext

import torch

from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.families import denoiser_family
from cat_engine.engine.row_aware import adapter_module_ids, check_adapter_layers, is_row_aware
from cat_engine.engine.split_batch import adapter_rows as _adapter_rows_ctx
from cat_engine.kernels.lora_linear import autocast_dtype

# Row-equality checks by value are done only for tensors this small per row (elements): the time
# embedding (1280 on SD1.5) and SDXL's added embedding input (2816) qualify, hidden states do not.
_VALUE_CHECK_MAX_ROW_ELEMENTS = 4096
_PATTERN_ATTR = "_cat_row_pattern"

NO_CHECKPOINT_STRATEGIES = ("split", "two_calls", "checkpoint")


# --------------------------------------------------------------------------------------------------
# Which UNets can run split: every LoRA layer must read adapter_rows.
# --------------------------------------------------------------------------------------------------


def row_unaware_layers(unet) -> list[str]:
    """Names of LoRA layers that would put their delta on every row (peft's own, not fused)."""
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # peft absent: there can be no peft layers
        return []
    return [n for n, m in unet.named_modules() if isinstance(m, LoraLayer) and not is_row_aware(m)]


# --------------------------------------------------------------------------------------------------
# Row patterns: which groups of rows of a tensor are known to be equal.
# --------------------------------------------------------------------------------------------------


def _canonical(pattern):
    """Renumber a pattern so that each group points at the first group equal to it."""
    first = {}
    return tuple(first.setdefault(p, g) for g, p in enumerate(pattern))


def _join(patterns):
    """Rows are equal in the output only where they are equal in every input."""
    return _canonical(tuple(zip(*patterns)))


class _Rows:
    """Which slots of a call's args/kwargs hold per-row tensors (leading dim == the call's rows)."""

    __slots__ = ("arg_idx", "kw_keys")

    def __init__(self, args, kwargs, n_rows):
        self.arg_idx = [
            i for i, a in enumerate(args) if torch.is_tensor(a) and a.dim() and a.shape[0] == n_rows
        ]
        self.kw_keys = [
            k for k, v in kwargs.items() if torch.is_tensor(v) and v.dim() and v.shape[0] == n_rows
        ]

    def tensors(self, args, kwargs):
        return [args[i] for i in self.arg_idx] + [kwargs[k] for k in self.kw_keys]

    def map(self, args, kwargs, fn):
        args = list(args)
        for i in self.arg_idx:
            args[i] = fn(args[i])
        kwargs = dict(kwargs)
        for k in self.kw_keys:
            kwargs[k] = fn(kwargs[k])
        return args, kwargs


def _map_out(out, fn):
    if torch.is_tensor(out):
        return fn(out)
    if isinstance(out, tuple):
        return tuple(_map_out(o, fn) for o in out)
    return out


def _cat_out(first, second):
    if torch.is_tensor(first):
        return torch.cat([first, second])
    if isinstance(first, tuple):
        return tuple(_cat_out(a, b) for a, b in zip(first, second))
    return first


# --------------------------------------------------------------------------------------------------
# The per-unit checkpoint Function.
# --------------------------------------------------------------------------------------------------


class _TakeRows(torch.autograd.Function):
    """``x[:n]`` as a fresh tensor (a view would keep all rows' storage alive when saved)."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.rows = x.shape[0]
        return x[:n].clone()

    @staticmethod
    def backward(ctx, grad):
        return _pad_rows(grad, ctx.rows), None


def _pad_rows(grad, rows):
    if grad is None or grad.shape[0] == rows:
        return grad
    return torch.cat([grad, grad.new_zeros((rows - grad.shape[0],) + tuple(grad.shape[1:]))])


# unit module -> {input shapes: (tensors its recompute saves for backward, its tail modules)}
_TAILS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _frozen_matmul_leaves(module):
    return [
        m
        for m in module.modules()
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and not any(p.requires_grad for p in m.parameters())
    ]


class _ValuelessFrozen(torch.autograd.Function):
    """A frozen Linear/Conv2d whose output values nobody reads: right shape, gradient, no compute.

    Backward needs only the weight: ``dx = dy W`` (linear), the transposed convolution (conv).
    """

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.shape = module, x.shape
        if isinstance(module, torch.nn.Linear):
            shape = (*x.shape[:-1], module.out_features)
        elif isinstance(module.padding, str):  # "same"/"valid": let the meta device work it out
            shape = module._conv_forward(x.to("meta"), module.weight.to("meta"), None).shape
        else:  # the output-size formula; a meta convolution would be counted by FLOP counters
            spatial = [
                (n + 2 * p - d * (k - 1) - 1) // s + 1
                for n, p, d, k, s in zip(
                    x.shape[2:], module.padding, module.dilation, module.kernel_size, module.stride
                )
            ]
            shape = (x.shape[0], module.out_channels, *spatial)
        device = x.device.type
        # Under autocast the real op would have produced the autocast dtype; match it.
        dtype = autocast_dtype(device) or x.dtype
        return x.new_empty(shape, dtype=dtype)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        if isinstance(m, torch.nn.Linear):
            return grad @ m.weight.to(grad.dtype), None
        dx = torch.nn.grad.conv2d_input(
            ctx.shape, m.weight.to(grad.dtype), grad, m.stride, m.padding, m.dilation, m.groups
        )
        return dx, None


def _valueless_forward(module, x):
    return _ValuelessFrozen.apply(x, module)


@contextmanager
def _skip_tail(module, args):
    """Recompute a unit without the frozen Linear/Conv2d calls that come after its last saved tensor.

    The recompute exists only to rebuild the unit's autograd graph for backward. A frozen
    Linear/Conv2d after which nothing more is saved (``ff.net.2`` ending a transformer block,
    ``conv2`` or the shortcut ending a resnet) produces values that nothing in backward reads, and
    its own backward needs only its weight; so it runs as :class:`_ValuelessFrozen`. torch's
    non-reentrant checkpoint skips the same tail (early stop), which a recompute that must return
    the unit's outputs cannot do by stopping. The first recompute of a unit (per input shapes) runs
    in full and finds the tail: the frozen Linear/Conv2d calls with no tensor saved after them.
    """
    key = tuple(tuple(a.shape) for a in args if torch.is_tensor(a))
    known = _TAILS.setdefault(module, {})
    if key in known:
        tail = known[key]
        for m in tail:
            # Function.apply takes positional arguments only (torch 2.11 refuses keywords).
            m.forward = functools.partial(_valueless_forward, m)
        try:
            yield
        finally:
            for m in tail:
                del m.forward
        return

    seen = 0
    after = []  # (leaf, tensors saved so far) after each frozen Linear/Conv2d call

    def pack(t):
        nonlocal seen
        seen += 1
        return t

    hooks = [
        m.register_forward_hook(lambda m, i, o: after.append((m, seen)))
        for m in _frozen_matmul_leaves(module)
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in hooks:
            h.remove()
    # A module called twice in one unit is left alone (its instance forward would serve both calls).
    calls = {}
    for m, _ in after:
        calls[m] = calls.get(m, 0) + 1
    known[key] = tuple(m for m, n in after if n == seen and calls[m] == 1 and "forward" not in m.__dict__)


class _AdapterRowCheckpoint(torch.autograd.Function):
    """One checkpointed unit: no-grad forward over all rows, recompute and backward on adapter rows.

    ``apply(call, module, kwargs, dummy, *args)``. ``dummy`` requires grad so that the outputs do
    even when no input does (a unit holding the first LoRA layer). Gradients w.r.t. the base rows'
    outputs are zero by construction (every consumer of a unit's output either row-splits or is a
    unit), so backward reads only the adapter rows of ``grad_outputs``.
    """

    @staticmethod
    def forward(ctx, call, module, kwargs, dummy, *args):
        device = next((a.device for a in args if torch.is_tensor(a)), torch.device("cpu"))
        ctx.rng = _rng_snapshot(device) if call.dropout else None
        # autograd runs Function.forward without grad: the base rows never enter the graph.
        out = call.run_unit(module, args, kwargs)
        n, rows = call.n_adapter, call.n_rows
        spec, saved = [], []
        for a in args:
            if torch.is_tensor(a):
                if a.dim() and a.shape[0] == rows:
                    saved.append(call.adapter_part(a, grad=False))
                    spec.append(("row", a.requires_grad))
                else:
                    saved.append(a)
                    spec.append(("tensor", a.requires_grad))
            else:
                spec.append(("obj", a))
        ctx.save_for_backward(*saved)
        ctx.spec, ctx.call, ctx.module, ctx.kwargs, ctx.n = spec, call, module, kwargs, n
        # The recompute runs in backward, outside the caller's autocast: record it to restore it.
        # (autocast_dtype is meta-safe: the VRAM estimator runs this step on the meta device.)
        ctx.autocast = (device.type, autocast_dtype(device.type))
        ctx.device = device
        return out

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved = iter(ctx.saved_tensors)
        args, leaves = [], []
        for kind, value in ctx.spec:
            if kind == "obj":
                args.append(value)
                continue
            t = next(saved).detach().requires_grad_(value)
            args.append(t)
            leaves.append(t if value else None)
        n = ctx.n
        device, dtype = ctx.autocast
        restore_autocast = (
            torch.autocast(device, dtype=dtype)
            if dtype is not None and device in ("cpu", "cuda")
            else nullcontext()
        )
        with (
            torch.enable_grad(),
            restore_autocast,
            _adapter_rows_ctx(ctx.call.unet, None),
            _replayed_rng(ctx.rng, ctx.device),
            _skip_tail(ctx.module, args),
        ):
            out = ctx.module(*args, **ctx.kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [
            (o, g[:n])
            for o, g in zip(outs, grad_outputs)
            if torch.is_tensor(o) and o.requires_grad and g is not None
        ]
        if pairs:
            # Like reentrant checkpointing: the recomputed inputs are leaves, so one backward both
            # accumulates the unit's LoRA gradients into .grad and leaves the input gradients on them.
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        result = []
        leaf = iter(leaves)
        for kind, _value in ctx.spec:
            if kind == "obj":
                result.append(None)
                continue
            t = next(leaf)
            g = None if t is None else t.grad
            result.append(_pad_rows(g, ctx.call.n_rows) if kind == "row" else g)
        return (None, None, None, None, *result)


def _rng_snapshot(device: torch.device):
    """The RNG states a unit's dropout draws from: the CPU generator's and, on CUDA, the device's."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replayed_rng(snapshot, device: torch.device):
    """Run the block from ``snapshot``'s RNG states (None: as they are); outside it nothing changes."""
    if snapshot is None:
        yield
        return
    cpu, cuda = snapshot
    index = (
        device.index if device.index is not None else (torch.cuda.current_device() if cuda is not None else 0)
    )
    with torch.random.fork_rng(devices=[index] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


# --------------------------------------------------------------------------------------------------
# One split call: dispatch of unit and glue module calls.
# --------------------------------------------------------------------------------------------------

_MISSING = object()
_call_ids = iter(range(1, 1 << 62))


def _glue_leaves(module):
    """Leaf modules, with a LoRA layer (a module holding ``lora_A``) counted as one leaf."""
    for child in module.children():
        if hasattr(child, "lora_A") or is_row_aware(child) or next(child.children(), None) is None:
            yield child
        else:
            yield from _glue_leaves(child)


def _glue_modules(module, family):
    """A transformer's glue: the largest modules that hold no block (the units), so that the
    elementwise work inside them (AdaLN modulation, position embedding adds) is row-split with them
    and never saves a base row. Containers are entered; blocks and position modules are left out."""
    for child in module.children():
        name = type(child).__name__
        if name in family.block_classes or name in family.position_modules:
            continue
        container = isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))
        if container or any(type(m).__name__ in family.block_classes for m in child.modules()):
            yield from _glue_modules(child, family)
        else:
            yield child


def _active_dropouts(module):
    return [
        (n, m)
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training
    ]


def _adapter_dropout(unet) -> bool:
    """Check the UNet's active dropouts; True when some LoRA layer's dropout will draw masks.

    A LoRA layer's dropout draws for the adapter rows only, the same rows in the forward over all
    rows and in the recompute, so the replayed RNG state gives the same masks. Any other dropout
    would draw over all rows in the forward and over the adapter rows in the recompute: refused.
    """
    inside = set()
    for m in unet.modules():
        if is_row_aware(m):
            inside.update(id(d) for _, d in _active_dropouts(m))
    for name, m in _active_dropouts(unet):
        if id(m) not in inside:
            raise ValueError(
                f"split-batch execution needs the model's own dropout off; {name} has p={m.p} in training mode "
                "(LoRA dropout is fine)"
            )
    return bool(inside)


class _SplitCall:
    """State of one split UNet call; its methods are what the UNet's modules call through."""

    def __init__(
        self, unet, n_rows: int, n_adapter: int, n_groups: int, checkpoint: bool, dropout: bool = False
    ):
        self.unet, self.n_rows, self.n_adapter = unet, n_rows, n_adapter
        self.n_groups, self.group_rows = n_groups, n_rows // n_groups
        self.checkpoint = checkpoint
        self.dropout = dropout  # LoRA dropout draws masks: each unit's recompute replays its RNG state
        self.token = next(_call_ids)
        self.depth = 0  # > 0 inside a unit or a split/shared module: its submodules run plainly
        self._adapter_modules = adapter_module_ids(unet)
        self._has_lora: dict[int, bool] = {}
        self._copies: dict[int, tuple] = {}  # id(x) -> (weakref(x), weakref(adapter-row copy))
        self._dummy = None

    # ---- helpers ------------------------------------------------------------------------------

    @contextmanager
    def inside(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def has_lora(self, module) -> bool:
        key = id(module)
        if key not in self._has_lora:
            self._has_lora[key] = any(id(m) in self._adapter_modules for m in module.modules())
        return self._has_lora[key]

    def dummy(self):
        if self._dummy is None:
            self._dummy = torch.empty(0, requires_grad=True)
        return self._dummy

    def mark(self, t, pattern):
        setattr(t, _PATTERN_ATTR, (self.token, pattern))
        return t

    def pattern(self, t):
        """Which groups of ``t``'s rows are equal (canonical tuple); distinct when unknown."""
        known = getattr(t, _PATTERN_ATTR, None)
        if known is not None and known[0] == self.token:
            return known[1]
        k, g = self.n_groups, self.group_rows
        # A value check reads the device, which CUDA graph capture forbids (engine/cuda_graphs.py).
        capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
        if t.requires_grad or t[0].numel() > _VALUE_CHECK_MAX_ROW_ELEMENTS or capturing:
            return tuple(range(k))
        chunks = [t[i * g : (i + 1) * g] for i in range(k)]
        pattern = tuple(next(j for j in range(i + 1) if torch.equal(chunks[j], chunks[i])) for i in range(k))
        self.mark(t, pattern)
        return pattern

    def adapter_part(self, x, grad: bool):
        """``x``'s adapter rows as a fresh tensor, made once per ``x`` and shared by every module of
        the call that takes them (the text embeddings feed every transformer block: one copy, not
        one per block). ``grad``: connected to ``x`` in autograd when ``x`` requires grad.

        A fresh tensor rather than the view ``x[:n]``: a saved view keeps all rows' storage alive.
        The memo holds weak references only, so a copy nobody saved is freed as usual.
        """
        entry = self._copies.get(id(x))
        if entry is not None and entry[0]() is x:
            copy = entry[1]()
            if copy is not None and (copy.requires_grad or not (grad and x.requires_grad)):
                return copy if grad else copy.detach()
        if grad and x.requires_grad:
            copy = _TakeRows.apply(x, self.n_adapter)
        else:
            copy = x[: self.n_adapter].detach().clone()
        self._copies[id(x)] = (weakref.ref(x), weakref.ref(copy))
        return copy

    # ---- the three ways of running a module over the rows ---------------------------------------

    def run_unit(self, fn, args, kwargs):
        with self.inside():
            return fn(*args, **kwargs)

    def run_shared(self, fn, args, kwargs, rows, pattern):
        """Run once per distinct group of rows, then expand to all groups."""
        reps = sorted(set(pattern))
        g = self.group_rows

        def take(t):
            return t[:g] if reps == [0] else torch.cat([t[r * g : (r + 1) * g] for r in reps])

        a, k = rows.map(args, kwargs, take)
        with self.inside():
            out = fn(*a, **k)
        pos = {r: i for i, r in enumerate(reps)}

        def expand(o):
            if not (o.dim() and o.shape[0] == len(reps) * g):
                return o
            return self.mark(torch.cat([o[pos[p] * g : (pos[p] + 1) * g] for p in pattern]), pattern)

        return _map_out(out, expand)

    def run_split(self, fn, args, kwargs, rows):
        """Base rows under no_grad, adapter rows with grad; outputs concatenated (adapter first)."""
        n = self.n_adapter
        with torch.no_grad(), _adapter_rows_ctx(self.unet, 0), self.inside():
            a, k = rows.map(args, kwargs, lambda t: t[n:].detach())  # a no_grad view still says requires_grad
            base = fn(*a, **k)
        a, k = rows.map(args, kwargs, lambda t: self.adapter_part(t, grad=True))
        with _adapter_rows_ctx(self.unet, None), self.inside():
            adapter = fn(*a, **k)
        return _cat_out(adapter, base)

    def dispatch(self, module, fn, args, kwargs, unit: bool):
        if self.depth:
            return fn(*args, **kwargs)
        rows = _Rows(args, kwargs, self.n_rows)
        tensors = rows.tensors(args, kwargs)
        if not tensors:
            return fn(*args, **kwargs)
        lora = self.has_lora(module)
        if torch.is_grad_enabled() and (lora or any(t.requires_grad for t in tensors)):
            if unit and self.checkpoint:
                return _AdapterRowCheckpoint.apply(self, fn, kwargs, self.dummy(), *args)
            if self.n_adapter < self.n_rows:
                return self.run_split(fn, args, kwargs, rows)
            return self.run_unit(fn, args, kwargs)
        if not lora and self.n_groups > 1:
            pattern = _join([self.pattern(t) for t in tensors])
            if len(set(pattern)) < self.n_groups:
                return self.run_shared(fn, args, kwargs, rows, pattern)
        return self.run_unit(fn, args, kwargs)

    # ---- entry points installed on the UNet's modules -------------------------------------------

    def unit(self, module, *args):
        """Installed as diffusers' ``_gradient_checkpointing_func``: called as ``func(module, *args)``."""
        return self.dispatch(module, module, args, {}, unit=True)

    def _glue(self, module, forward):
        def glue_forward(*args, **kwargs):
            return self.dispatch(module, forward, args, kwargs, unit=False)

        return glue_forward

    @contextmanager
    def installed(self, force_units: bool):
        """Route the UNet's units and glue leaves through this call; restore everything on exit.

        ``force_units``: switch diffusers' checkpointing flag on for every module that has one, so
        that units pass through :meth:`unit` even when the user did not enable checkpointing.
        """
        flagged, wrapped = [], []
        try:
            for m in self.unet.modules():
                if hasattr(m, "gradient_checkpointing"):
                    flagged.append(
                        (
                            m,
                            m.gradient_checkpointing,
                            m.__dict__.get("_gradient_checkpointing_func", _MISSING),
                        )
                    )
                    if force_units:
                        m.gradient_checkpointing = True
                    if m.gradient_checkpointing:
                        m._gradient_checkpointing_func = self.unit
            family = denoiser_family(self.unet)
            glue = _glue_leaves(self.unet) if family is None else _glue_modules(self.unet, family)
            for leaf in glue:
                wrapped.append((leaf, leaf.__dict__.get("forward", _MISSING)))
                leaf.forward = self._glue(leaf, leaf.forward)
            yield self
        finally:
            for leaf, previous in reversed(wrapped):
                if previous is _MISSING:
                    del leaf.forward
                else:
                    leaf.forward = previous
            for m, flag, func in flagged:
                m.gradient_checkpointing = flag
                if func is _MISSING:
                    m.__dict__.pop("_gradient_checkpointing_func", None)
                else:
                    m._gradient_checkpointing_func = func


def _take(obj, rows: slice, n_rows: int):
    """``rows`` of every per-row tensor (first dimension ``n_rows``) in ``obj``; anything else as is."""
    if isinstance(obj, dict):
        return {k: _take(v, rows, n_rows) for k, v in obj.items()}
    if torch.is_tensor(obj) and obj.dim() and obj.shape[0] == n_rows:
        return obj[rows]
    return obj


def split_batch_call(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    embeds: torch.Tensor,
    adapter_rows: int,
    added_cond_kwargs: dict | None = None,
    *,
    no_checkpoint: str = "two_calls",
    **unet_kwargs,
) -> torch.Tensor:
    """One UNet call over a split batch; returns the prediction for all ``N`` rows.

    Args:
        unet: diffusers ``UNet2DConditionModel``, or a diffusion transformer of ``engine/families/``,
            whose LoRA layers are fused (``fuse_lora``).
        latents: ``[N, C, H, W]``, or ``[G, C, H, W]`` with ``N = k * G`` when the ``k`` groups of rows
            share the same latents (CAT: token, plain and base rows share ``z_t``). Shared latents let
            the LoRA-free work before the first LoRA layer run once per distinct group.
        timesteps: ``[N]``, ``[G]`` (repeated like ``latents``) or a scalar.
        embeds: ``encoder_hidden_states``, ``[N, L, D]``.
        adapter_rows: the first ``adapter_rows`` rows carry the adapter and gradients; the others are
            the frozen model's, computed without autograd (their outputs have no gradient path).
        added_cond_kwargs: SDXL's ``{"text_embeds": [N, P], "time_ids": [N, 6]}``; a transformer
            family's per-row conditioning (``engine/denoiser.py``).
        no_checkpoint: how to keep base rows out of autograd when the UNet has no gradient
            checkpointing: ``"two_calls"`` (default: adapter rows with grad, then base rows under
            no_grad), ``"split"`` (one call, every unit and glue module row-split; shares the
            pre-LoRA work but launches more, slower on a GPU), or ``"checkpoint"`` (the checkpoint
            Function on every unit: least memory, one more forward of the adapter rows).
        unet_kwargs: the UNet's other keyword arguments (``class_labels``, ``timestep_cond``,
            ``encoder_attention_mask``, ``cross_attention_kwargs``, ...); every tensor in them whose
            first dimension is ``N`` is per-row, the rest is shared by all rows.

    Gradients reach the LoRA weights through ``loss.backward()`` (units recompute reentrantly and
    accumulate into ``.grad``; ``torch.autograd.grad`` w.r.t. LoRA weights is not supported).
    """
    n_rows = embeds.shape[0]
    g = latents.shape[0]
    if g == 0 or n_rows % g:
        raise ValueError(f"latents have {g} rows; embeds' {n_rows} rows must be a whole multiple of them")
    if not 0 <= adapter_rows <= n_rows:
        raise ValueError(f"adapter_rows must be in [0, {n_rows}], got {adapter_rows}")
    if no_checkpoint not in NO_CHECKPOINT_STRATEGIES:
        raise ValueError(f"no_checkpoint must be one of {NO_CHECKPOINT_STRATEGIES}, got {no_checkpoint!r}")
    unaware = row_unaware_layers(unet)
    if unaware:
        raise ValueError(
            f"split_batch_call: {len(unaware)} LoRA layer(s) would put their delta on the base rows too "
            f"({unaware[0]}, ...); call cat_engine.engine.fuse_lora(unet) first (LoRA on convolutions "
            "is not fused and cannot run split)"
        )
    check_adapter_layers(unet, "split_batch_call")
    dropout = _adapter_dropout(unet)
    n_groups = n_rows // g
    if torch.is_tensor(timesteps) and timesteps.dim() == 1 and timesteps.shape[0] == g and n_groups > 1:
        timesteps = timesteps.repeat(n_groups)
    checkpointing = unet.is_gradient_checkpointing

    if (
        not checkpointing
        and no_checkpoint == "two_calls"
        and torch.is_grad_enabled()
        and 0 < adapter_rows < n_rows
    ):
        full = latents.repeat(n_groups, 1, 1, 1) if n_groups > 1 else latents
        per_row = torch.is_tensor(timesteps) and timesteps.dim() == 1 and timesteps.shape[0] == n_rows
        ada, base = slice(0, adapter_rows), slice(adapter_rows, n_rows)
        with _adapter_rows_ctx(unet, None):
            pred_adapter = unet_forward(
                unet,
                full[ada],
                timesteps[ada] if per_row else timesteps,
                embeds[ada].clone(),  # a saved view would keep the base rows' embeddings alive
                _take(added_cond_kwargs, ada, n_rows),
                **_take(unet_kwargs, ada, n_rows),
            )
        with torch.no_grad(), _adapter_rows_ctx(unet, 0):
            pred_base = unet_forward(
                unet,
                full[base],
                timesteps[base] if per_row else timesteps,
                embeds[base],
                _take(added_cond_kwargs, base, n_rows),
                **_take(unet_kwargs, base, n_rows),
            )
        return torch.cat([pred_adapter, pred_base])

    call = _SplitCall(
        unet,
        n_rows,
        adapter_rows,
        n_groups,
        checkpoint=checkpointing or no_checkpoint == "checkpoint",
        dropout=dropout,
    )
    if n_groups > 1:
        latents = call.mark(latents.repeat(n_groups, 1, 1, 1), (0,) * n_groups)
    # No adapter rows: nothing may enter autograd at all.
    grad = torch.is_grad_enabled() and adapter_rows > 0
    with (
        torch.set_grad_enabled(grad),
        _adapter_rows_ctx(unet, adapter_rows),
        call.installed(force_units=not checkpointing),
    ):
        return unet_forward(unet, latents, timesteps, embeds, added_cond_kwargs, **unet_kwargs)
