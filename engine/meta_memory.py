"""Counting a step's memory on the meta device, as a CUDA caching allocator would see it (engine/vram.py).

* :class:`LiveBytes`: a dispatch mode that follows every storage an op allocates until it is freed,
  keeping the current and the peak sum (weights and other storages known before the step excluded).
* :class:`MetaCuda`: a function mode that makes a meta run allocate what a CUDA run allocates:
  autocast's casts (meta tensors have no autocast) and SDPA as the flash kernel (not the math
  decomposition meta would otherwise take).
* :func:`run_backward`: backward straight to the autograd engine, so the modes stay on for the
  checkpoint recomputation inside it.

Quantised weights (torchao tensor subclasses, ``engine/quantize.py``) are counted by their plain
inner tensors, which is what the allocator holds.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from cat_engine.engine.quantize import plain_tensors

# The caching allocator hands out blocks in multiples of 512 bytes.
ALLOC_ROUND = 512


def rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND


def storage_keys(tensors) -> set[int]:
    """The storages holding ``tensors`` (a quantised tensor: its inner tensors')."""
    return {leaf.untyped_storage()._cdata for t in tensors for leaf in plain_tensors(t)}


class LiveBytes(TorchDispatchMode):
    """Follows every storage an op allocates until it is freed; keeps the current and peak sum.

    Storages in ``known`` (weights, created before the step) are not counted. Views and in-place
    results share a counted storage, so they add nothing, as on a real allocator.
    """

    def __init__(self, known: set[int]):
        super().__init__()
        self.known = known
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                for leaf in plain_tensors(t):
                    self._track(leaf)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.known:
            return
        nbytes = rounded(storage.nbytes())
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


# Autocast's cast policy, per device type (aten/src/ATen/autocast_mode.cpp), restricted to the ops
# a diffusers UNet or transformer and the CAT loss call. Meta tensors have no autocast dispatch key,
# so a function mode (above autograd, where autocast sits) applies the same casts.
def _policy(device_type: str):
    lower = {
        F.linear, F.conv2d, torch.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.mm,
        torch.einsum, F.scaled_dot_product_attention,
    }  # fmt: skip
    fp32 = {F.mse_loss}
    if device_type == "cuda":
        fp32 |= {
            F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm, F.softmax, torch.softmax,
            torch.Tensor.softmax, F.log_softmax, torch.exp, torch.Tensor.exp, torch.log, torch.rsqrt,
        }  # fmt: skip
    return lower, fp32


class MetaCuda(TorchFunctionMode):
    """Makes a meta run allocate what a CUDA run allocates: autocast casts and flash SDPA.

    Like autocast, casts of trainable weights (the LoRA weights where a plain ``F.linear`` takes
    them) are cached: one copy per weight, not one per call. Autocast caches them per autocast
    region (the forward; each checkpoint recompute); here for the whole step, an overcount of at
    most half the LoRA weights' bytes. (Autocast also caches other leaves that require grad, the
    recompute's detached inputs; few of them meet a matmul directly, so they are cast per call.)
    """

    def __init__(
        self, autocast_dtype: torch.dtype | None, device_type: str = "cuda", flash_sdpa: bool = True
    ):
        super().__init__()
        self.dtype = autocast_dtype
        self.lower, self.fp32 = _policy(device_type)
        self.flash_sdpa = flash_sdpa
        self.cache: dict[tuple[int, torch.dtype], tuple[weakref.ref, torch.Tensor]] = {}

    def _cast(self, tree, dtype):
        def cast(x):
            if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype):
                return x
            if not (isinstance(x, torch.nn.Parameter) and x.requires_grad):
                return x.to(dtype)
            hit = self.cache.get((id(x), dtype))
            if hit is None or hit[0]() is not x:
                hit = (weakref.ref(x), x.to(dtype))
                self.cache[(id(x), dtype)] = hit
            return hit[1]

        return tree_map(cast, tree)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None:
            if func in self.lower:
                args, kwargs = self._cast((args, kwargs), self.dtype)
            elif func in self.fp32:
                args, kwargs = self._cast((args, kwargs), torch.float32)
        if func is F.scaled_dot_product_attention and self.flash_sdpa:
            return _flash_sdpa(*args, **kwargs)
        if func is torch.equal and any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
            # Meta tensors have no values. The split-batch executor compares small tensors (the
            # time embedding) to share rows between CAT groups; "different" is the answer that
            # never underestimates (shared rows only save memory), except for a view compared with
            # itself, which is equal whatever the values.
            a, b = args[0], args[1]
            return (
                a.untyped_storage()._cdata == b.untyped_storage()._cdata
                and a.storage_offset() == b.storage_offset()
                and a.shape == b.shape
                and a.stride() == b.stride()
            )
        return func(*args, **kwargs)


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    # On meta, SDPA decomposes to the math path (it saves the [N, N] probabilities). CUDA runs
    # flash / memory-efficient kernels, which save q, k, v, out and a [B, H, N] fp32 log-sum-exp:
    # the CPU flash op saves exactly that set, and has meta kernels forward and backward. diffusers'
    # transformers call it with keywords (and enable_gqa, which their head counts never need).
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )[0]


@contextlib.contextmanager
def assume_nonzero_all():
    """Boolean-mask indexing on meta (Z-Image keeps each row's text tokens by mask) has no size to
    give; torch can assume every element is selected, the conservative answer for memory. Where this
    torch has no such switch, nothing changes (and the step fails, which the planner reports)."""
    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:
        yield
        return
    if not hasattr(fx_config, "meta_nonzero_assume_all_nonzero"):
        yield
        return
    previous = fx_config.meta_nonzero_assume_all_nonzero
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        fx_config.meta_nonzero_assume_all_nonzero = previous


def run_backward(loss: torch.Tensor) -> None:
    # Straight to the autograd engine: ``Tensor.backward`` goes through ``__torch_function__``,
    # and a function mode is switched off while it handles a call, so checkpoint recomputation
    # inside backward would run without the autocast casts.
    torch.autograd.Variable._execution_engine.run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), True, True
    )
