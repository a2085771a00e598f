"""Block offloading (engine/offload.py): every block is on the device whenever it runs (forward and
the checkpoint recompute in backward), at most two blocks are, and the numbers do not change.

On a CPU the device is the CPU and a fetch is a copy: a block running on its fetched copy (not on
its home tensors) is the observable sign that it was moved in time.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cat_engine.cat.loss import batch_loss
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters
from cat_engine.engine.memory_plan import MemoryPlan, MemoryPlanError, apply_memory_plan
from cat_engine.engine.offload import BlockOffload, block_offload, frozen_block_bytes, offload_blocks
from cat_engine.engine.quantize import plain_tensors

FAMILIES = list(DIT_FAMILIES)


@pytest.fixture
def make_model(lora_transformer):
    """The tiny transformer with LoRA, checkpointed (offloading needs it)."""

    def make(family, quant="none"):
        m = lora_transformer(family, quant)
        m.enable_gradient_checkpointing()
        return m

    return make


def _step(model, family, cat_weight=1.0):
    batch = DIT_FAMILIES[family].example_batch(
        model.config, 2, 16, 7, generator=torch.Generator().manual_seed(2)
    )
    batch = batch.to(lora_parameters(model)[0].device)
    for p in lora_parameters(model):
        p.grad = None
    out = batch_loss(model, batch, cat_weight)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in lora_parameters(model)]


def _pointers(block):
    return {id(t): [leaf.data_ptr() for leaf in plain_tensors(t)] for t in _frozen(block)}


def _frozen(block):
    return [t for t in (*block.parameters(), *block.buffers()) if not t.requires_grad]


class _Watch:
    """Registered after the offload's hooks: records, each time a block runs, whether every frozen
    tensor of it is a fetched copy (not its home tensor) and how many blocks are on the device."""

    def __init__(self, offload: BlockOffload):
        self.offload = offload
        self.home = [{id(e.home): e for e in entries} for entries in offload.entries]
        self.runs: list[tuple[int, bool, int]] = []
        self.hooks = [b.register_forward_pre_hook(self._hook(i)) for i, b in enumerate(offload.blocks)]

    def _hook(self, i):
        def hook(module, args):
            fetched = all(id(t) not in self.home[i] for t in _frozen(module))
            # no frozen tensor of the block shares storage with its home tensor
            homes = {
                p
                for e in self.offload.entries[i]
                for p in (leaf.data_ptr() for leaf in plain_tensors(e.home))
            }
            apart = all(p not in homes for ptrs in _pointers(module).values() for p in ptrs)
            on_device = len(self.offload.resident) + len(self.offload.inflight)
            self.runs.append((i, fetched and apart, on_device))

        return hook


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_offloaded_step_equals_the_resident_one(family, quant, make_model):
    resident = make_model(family, quant)
    offloaded = copy.deepcopy(resident)
    offload = BlockOffload(offloaded, "cpu")
    watch = _Watch(offload)
    want_loss, want_grads = _step(resident, family)
    got_loss, got_grads = _step(offloaded, family)
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))
    n = len(offload.blocks)
    # every block ran on its fetched copy, in the forward and in the recompute of backward
    assert all(ok for _, ok, _ in watch.runs)
    assert sorted({i for i, _, _ in watch.runs}) == list(range(n))
    assert all(sum(1 for i, _, _ in watch.runs if i == b) >= 2 for b in range(n))
    assert max(r for *_, r in watch.runs) <= 2  # the running block and the one being fetched
    # backward recomputes the blocks in reverse order
    order = [i for i, _, _ in watch.runs]
    assert order[:n] == list(range(n)) and order[n:] == list(range(n))[::-1]
    # nothing of the frozen model got a gradient
    assert all(p.grad is None for name, p in offloaded.named_parameters() if "lora_" not in name)


def test_prefetch_follows_the_direction_and_copies_each_block_once_per_pass(make_model):
    model = make_model("flux")
    offload = BlockOffload(model, "cpu")
    seen = []
    for i, b in enumerate(offload.blocks):
        b.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, sorted(offload.inflight))))
    _step(model, "flux")
    n = len(offload.blocks)
    forward, backward = seen[:n], seen[n:]
    assert all(inflight == ([i + 1] if i + 1 < n else []) for i, inflight in forward)
    assert all(inflight == ([i - 1] if i > 0 else []) for i, inflight in backward)
    assert offload.fetches == 2 * n - 1  # the forward's last block is recomputed first, still resident


def test_several_steps_train_the_same_adapter(make_model):
    family = "sd3"
    resident = make_model(family)
    offloaded = copy.deepcopy(resident)
    BlockOffload(offloaded, "cpu")
    optimizers = [torch.optim.AdamW(lora_parameters(m), lr=1e-2) for m in (resident, offloaded)]
    for _ in range(3):
        for model, opt in zip((resident, offloaded), optimizers):
            _step(model, family)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(resident), lora_parameters(offloaded)))


def test_remove_puts_every_block_home(make_model):
    model = make_model("zimage")
    blocks = offload_blocks(model)
    before = [[id(t) for t in _frozen(b)] for b in blocks]
    offload = BlockOffload(model, "cpu")
    _step(model, "zimage")
    assert offload.resident  # the last block run stays until the next fetch
    offload.remove()
    assert [[id(t) for t in _frozen(b)] for b in blocks] == before
    assert block_offload(model) is None
    assert not model._forward_pre_hooks and not any(b._forward_pre_hooks for b in blocks)


def test_plain_lora_step_through_diffusers_checkpointing(make_model):
    """cat weight 0: one call with every row an adapter row, diffusers' own checkpoint function."""
    resident = make_model("flux")
    offloaded = copy.deepcopy(resident)
    offload = BlockOffload(offloaded, "cpu")
    watch = _Watch(offload)
    want = _step(resident, "flux", cat_weight=0.0)
    got = _step(offloaded, "flux", cat_weight=0.0)
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[1], want[1]))
    assert all(ok for _, ok, _ in watch.runs)


def test_memory_plan_installs_offloading(make_model):
    model = make_model("sd3")
    assert frozen_block_bytes(model) > 0.5 * sum(t.numel() * t.element_size() for t in model.parameters())
    ctx = apply_memory_plan(model, MemoryPlan(gradient_checkpointing=True, offload=True), "cpu")
    assert ctx.plan.offload and block_offload(model) is not None


def test_refusals():
    with pytest.raises(MemoryPlanError, match="--offload needs --gradient-checkpointing"):
        MemoryPlan(offload=True)
    unet = fuse_lora(add_lora(tiny_unet(), rank=4))
    with pytest.raises(MemoryPlanError, match="a UNet cannot offload"):
        apply_memory_plan(unet, MemoryPlan(gradient_checkpointing=True, offload=True), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", ["none", "int8"])
def test_offloaded_step_on_cuda_equals_the_resident_one(quant, make_model):
    resident = make_model("flux", quant).to("cuda")
    offloaded = make_model("flux", quant)
    offload = BlockOffload(offloaded, "cuda")
    assert all(t.device.type == "cpu" for b in offload.blocks for t in _frozen(b))
    assert all(p.device.type == "cuda" for p in lora_parameters(offloaded))
    want = _step(resident, "flux")
    got = _step(offloaded, "flux")
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)
