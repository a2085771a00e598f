"""Shared builders of the engine's tests."""

import pytest
import torch

from cat_engine.engine.lora import perturb_lora_b


@pytest.fixture
def lora_transformer():
    """``make(family, quant="none", lora_std=0.1)``: the tiny transformer of ``family`` with a fused
    LoRA adapter on its default targets (``lora_B`` drawn with ``lora_std``, so the delta shows),
    its frozen Linear weights quantised with ``quant`` (engine/quantize.py)."""
    from cat_engine.engine.builtin_dit import tiny_transformer
    from cat_engine.engine.families import DIT_FAMILIES
    from cat_engine.engine.lora import add_lora, fuse_lora
    from cat_engine.engine.quantize import quantize_frozen

    def make(family: str, quant: str = "none", lora_std: float = 0.1):
        if quant != "none":
            pytest.importorskip("torchao")
        torch.manual_seed(0)
        model = tiny_transformer(family).eval()
        add_lora(model, rank=4, targets=DIT_FAMILIES[family].default_targets, seed=1)
        perturb_lora_b(model, lora_std)  # peft starts B at zero: make the delta show
        fuse_lora(model)
        quantize_frozen(model, quant)
        return model

    return make
