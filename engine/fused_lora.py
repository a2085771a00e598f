"""peft LoRA linears that run the fused split-batch op (docs/design.md §4, §5).

Fusing changes the *class* of each of peft's ``lora.Linear`` modules to :class:`FusedLoraLinear`,
a subclass that only overrides ``forward``. The module objects, their ``Parameter`` objects, their
names and so the state-dict keys stay exactly as peft made them: an optimizer built before keeps
working, ``get_peft_model_state_dict`` / ``save_lora`` see the same keys, and peft's own methods
(``disable_adapters``, ``set_adapter``, ``merge``) still apply. Where the fused op cannot reproduce
peft's maths (adapters disabled or merged, several active adapters, DoRA and other variants,
``fan_in_fan_out``, mixed-adapter batches, an input dtype other than the weight's outside autocast),
the layer runs peft's own forward.

The delta goes to the first ``adapter_rows`` rows of dim 0, read at call time from the UNet's
:class:`~cat_engine.engine.split_batch.SplitBatchState`, shared by reference with every layer.

Gradient checkpointing: a checkpointed block re-runs its forward during backward and the layers
read ``adapter_rows`` again then, so run ``backward()`` while the same ``adapter_rows`` setting is
active (inside the ``with adapter_rows(unet, k):`` block) or the recomputation differs from the
forward that produced the loss.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.quantize import is_quantized_linear, lora_on_quantized_base
from cat_engine.engine.split_batch import STATE_ATTR, SplitBatchState
from cat_engine.kernels import dispatch, lora_linear
from cat_engine.kernels.lora_linear import autocast_dtype


class LoraPathError(CatEngineError):
    """``CAT_ENGINE_LORA_PATH`` names no path; the message says which values it takes."""


# Where a fused layer keeps its route (see FusedLoraLinear._cat_route).
ROUTE_ATTR = "_cat_route_cache"


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` whose forward calls :func:`cat_engine.kernels.lora_linear`.

    Whether the layer can run the fused op depends on peft's adapter state (disabled, merged, the
    active adapter, its variant), which changes only through peft's methods; the answer and the
    modules it names are kept as the layer's *route*, rebuilt when that state differs from the one
    it was made for (or when an adapter is added or deleted), so a call does not walk peft's
    properties again. What can differ per call (extra arguments, the input's rank and dtype,
    autocast, dropout's training flag, the scale) is checked per call.
    """

    def _cat_state(self):
        """peft's state the route depends on, as a value (None: this peft keeps it elsewhere)."""
        d = self.__dict__
        if "_active_adapter" not in d or "merged_adapters" not in d or "_disable_adapters" not in d:
            return None
        active = d["_active_adapter"]
        return (
            d["_disable_adapters"],
            tuple(d["merged_adapters"]),
            active if isinstance(active, str) else tuple(active),
        )

    def _cat_fusable_layer(self) -> bool:
        """Whether peft's state lets this layer run the fused op (what does not depend on the call)."""
        if self.disable_adapters or self.merged or self.fan_in_fan_out:
            return False
        active = self.active_adapters
        if len(active) != 1 or active[0] not in self.lora_A:
            return False
        name = active[0]
        if name in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(name, False):
            return False
        base = self.get_base_layer()
        if type(base) is not torch.nn.Linear and not is_quantized_linear(base):  # engine/quantize.py
            return False
        return isinstance(self.lora_dropout[name], (torch.nn.Dropout, torch.nn.Identity))

    def _cat_route(self):
        """``(state, name, base layer, lora_A module, lora_B module, dropout module)`` of the active
        adapter to fuse, or ``(state, None)`` for peft's forward."""
        state = self._cat_state()
        route = self.__dict__.get(ROUTE_ATTR)
        if route is None or state is None or route[0] != state:
            route = (state, None)
            if self._cat_fusable_layer():
                name = self.active_adapters[0]
                route = (
                    state,
                    name,
                    self.get_base_layer(),
                    self.lora_A[name],
                    self.lora_B[name],
                    self.lora_dropout[name],
                )
            if state is not None:
                self.__dict__[ROUTE_ATTR] = route
        return route

    def update_layer(self, *args, **kwargs):
        self.__dict__.pop(ROUTE_ATTR, None)
        return super().update_layer(*args, **kwargs)

    def delete_adapter(self, *args, **kwargs):
        self.__dict__.pop(ROUTE_ATTR, None)
        return super().delete_adapter(*args, **kwargs)

    def _refuse_split_fallback(self, x: torch.Tensor) -> None:
        """peft's forward puts the delta on every row: wrong inside a split batch, so say so.

        The one fallback that stays right is the base model everywhere: adapters disabled (and
        not merged) with no adapter rows, which is what ``adapters_disabled`` sets up.
        """
        rows = getattr(self, STATE_ATTR).adapter_rows
        if rows is None or x.dim() < 1 or rows >= x.shape[0]:
            return
        if rows == 0 and self.disable_adapters and not self.merged:
            return
        raise RuntimeError(
            f"fused LoRA layer: this layer cannot run a split batch ({rows} of {x.shape[0]} rows with the "
            "adapter) because it falls back to peft's forward (several active adapters, a merged "
            "adapter, DoRA, fan_in_fan_out, extra arguments, or an input dtype that differs from the "
            "weight's outside autocast); use one plain LoRA adapter, or call it without a split batch"
        )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = self._cat_route()
        if route[1] is None or args or kwargs or x.dim() < 2:
            self._refuse_split_fallback(x)
            return super().forward(x, *args, **kwargs)
        _, name, base, lora_A, lora_B, dropout = route
        weight = base.weight
        # Outside autocast, a dtype mismatch is peft's (and F.linear's) to report.
        if x.dtype != weight.dtype and autocast_dtype(x.device.type) is None:
            self._refuse_split_fallback(x)
            return super().forward(x, *args, **kwargs)
        if is_quantized_linear(base):  # engine/quantize.py
            return lora_on_quantized_base(self, x, self.__dict__[STATE_ATTR].adapter_rows)
        return lora_linear(
            x, weight, base.bias, lora_A.weight, lora_B.weight, self.scaling[name],
            self.__dict__[STATE_ATTR].adapter_rows,
            dropout_p=dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0, training=dropout.training,
        )  # fmt: skip


def fuse_lora_layers(model: torch.nn.Module, state: SplitBatchState) -> int:
    """Turn every peft ``lora.Linear`` in ``model`` into a :class:`FusedLoraLinear` reading ``state``.

    Returns how many layers are fused (already fused ones included). Subclasses of peft's Linear
    (quantized and other backends) are left alone: their forward is not plain ``F.linear``.
    Raises :class:`LoraPathError` when ``CAT_ENGINE_LORA_PATH`` is set to no known path, so a typo
    stops the run here, in one line, rather than at the first layer call.
    """
    try:
        dispatch.forced_path()
    except ValueError as exc:
        raise LoraPathError(str(exc)) from None
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
        if type(module) is FusedLoraLinear:
            # nn.Module.__setattr__ stores a plain object in __dict__; no buffer or submodule.
            setattr(module, STATE_ATTR, state)
            count += 1
    return count


def unfuse_lora_layers(model: torch.nn.Module) -> int:
    """Turn every :class:`FusedLoraLinear` back into peft's ``lora.Linear``; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is FusedLoraLinear:
            module.__class__ = PeftLoraLinear
            module.__dict__.pop(STATE_ATTR, None)
            count += 1
    return count


def fused_layers(model: torch.nn.Module) -> list[str]:
    """Names of the fused LoRA layers in ``model``."""
    return [n for n, m in model.named_modules() if type(m) is FusedLoraLinear]
