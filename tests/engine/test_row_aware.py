"""engine/row_aware.py: what the split batch accepts, on small modules (cat_loss-level behaviour,
kohya-style layers included, is in tests/cat/test_cat_loss.py)."""

import pytest
import torch

from cat_engine.engine.row_aware import (
    SplitBatchError,
    adapter_layer_problem,
    adapter_module_ids,
    check_adapter_layers,
    check_bare_model,
    register_row_aware,
    verified,
    wrapper_name,
)


class Adapter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.up(x)


def _model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4)))
    return model.requires_grad_(False)


def test_a_frozen_model_passes_and_a_trainable_weight_outside_any_layer_does_not():
    model = _model()
    assert adapter_layer_problem(model) is None
    model[1][0].bias.requires_grad_(True)
    assert "trainable parameter 1.0.bias" in adapter_layer_problem(model)


def test_registered_layers_may_hold_trainable_weights_and_patch_forwards():
    @register_row_aware
    class Patch(Adapter):
        pass

    model = _model()
    model.append(Patch())  # a registered layer inside the model: its weights are known
    assert adapter_layer_problem(model) is None
    foreign, aware = Adapter(), Patch()
    model[0].forward = foreign.forward
    assert "0.forward is replaced by Adapter.forward" in adapter_layer_problem(model)
    model[0].forward = aware.forward  # kohya-style, by a registered instance: accepted
    assert adapter_layer_problem(model) is None
    ids = adapter_module_ids(model)
    assert id(model[0]) in ids and id(model[2]) in ids and id(model[1][0]) not in ids
    with pytest.raises(TypeError):
        register_row_aware(object)


def test_verified_skips_the_walk_for_that_model_only():
    model, other = _model(), _model()
    model[0].weight.requires_grad_(True)
    other[0].weight.requires_grad_(True)
    with verified(model):
        check_adapter_layers(model, "test")
        with pytest.raises(SplitBatchError, match="test: trainable parameter 0.weight"):
            check_adapter_layers(other, "test")
    with pytest.raises(SplitBatchError):
        check_adapter_layers(model, "test")


def test_wrappers_are_named_by_their_class():
    class FSDPModule(torch.nn.Module):  # the name FSDP2's fully_shard gives every sharded module's class
        pass

    class FSDPLinear(FSDPModule):
        pass

    assert wrapper_name(FSDPLinear()) == "FSDPModule"
    assert wrapper_name(torch.nn.DataParallel(torch.nn.Linear(2, 2))) == "DataParallel"
    assert wrapper_name(torch.nn.Linear(2, 2)) is None
    with pytest.raises(SplitBatchError, match="wrapped in FSDPModule"):
        check_bare_model(FSDPLinear(), "cat_loss")
