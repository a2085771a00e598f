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

from cat_engine.engine.quantize import is_quantized_linear, lora_on_quantized_base
from cat_engine.engine.split_batch import STATE_ATTR, SplitBatchState
from cat_engine.kernels import lora_linear
from cat_engine.kernels.lora_linear import autocast_dtype


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` whose forward calls :func:`cat_engine.kernels.lora_linear`."""

    def _cat_fusable(self, x: torch.Tensor, args, kwargs) -> bool:
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out or x.dim() < 2:
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
        dropout = self.lora_dropout[name]
        if not isinstance(dropout, (torch.nn.Dropout, torch.nn.Identity)):
            return False
        # Outside autocast, a dtype mismatch is peft's (and F.linear's) to report.
        return x.dtype == base.weight.dtype or autocast_dtype(x.device.type) is not None

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
        if not self._cat_fusable(x, args, kwargs):
            self._refuse_split_fallback(x)
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        base = self.get_base_layer()
        if is_quantized_linear(base):
            return lora_on_quantized_base(self, x, getattr(self, STATE_ATTR).adapter_rows)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
        return lora_linear(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
            self.scaling[name], getattr(self, STATE_ATTR).adapter_rows,
            dropout_p=p, training=dropout.training,
        )


def fuse_lora_layers(model: torch.nn.Module, state: SplitBatchState) -> int:
    """Turn every peft ``lora.Linear`` in ``model`` into a :class:`FusedLoraLinear` reading ``state``.

    Returns how many layers are fused (already fused ones included). Subclasses of peft's Linear
    (quantized and other backends) are left alone: their forward is not plain ``F.linear``.
    """
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
