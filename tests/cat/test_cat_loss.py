"""cat_loss (one split-batch call) equals the three-pass reference: loss and every LoRA gradient.

Two references: ``cat_loss_reference`` on the same (fused) UNet, and an independent three-pass
computation written here on an unfused peft twin with peft's own ``disable_adapters``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from cat_engine.cat.loss import CatLossOutput, batch_loss, cat_loss, cat_loss_reference, step_loss
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.builtin import tiny_unet
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters, perturb_lora_b

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
BATCH = 2


def _models(family: str, checkpointing: bool, dropout: float = 0.0, **unet_config):
    torch.manual_seed(0)
    peft = tiny_unet(family, **unet_config).eval()
    add_lora(peft, rank=4, seed=1, dropout=dropout)
    perturb_lora_b(peft, 0.05)  # peft starts B at zero: make the delta show
    engine = fuse_lora(copy.deepcopy(peft))
    if checkpointing:
        engine.enable_gradient_checkpointing()
    return engine, peft


def _inputs(unet, family: str, mode: str):
    g = torch.Generator().manual_seed(1)
    width = unet.config.cross_attention_dim
    z = torch.randn(BATCH, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    target = torch.randn(BATCH, 4, 16, 16, generator=g)
    token = torch.randn(BATCH, 77, width, generator=g)
    if mode == "distinct":  # class/strip modes: another caption per row
        plain = torch.randn(BATCH, 77, width, generator=g)
    else:  # "empty": one caption (the empty prompt) for every row
        plain = torch.randn(1, 77, width, generator=g).expand(BATCH, -1, -1).contiguous()
    added = plain_added = None
    if family == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(BATCH, 1)
        added = {"text_embeds": torch.randn(BATCH, 32, generator=g), "time_ids": time_ids}
        if mode == "distinct":
            plain_added = {"text_embeds": torch.randn(BATCH, 32, generator=g), "time_ids": time_ids}
        elif mode == "empty":
            pooled = torch.randn(1, 32, generator=g).expand(BATCH, -1).contiguous()
            plain_added = {"text_embeds": pooled, "time_ids": time_ids}
        # mode "same_pooled": plain_added None, the token rows' pooled embeds serve both
    return dict(
        noisy_latents=z,
        timesteps=t,
        token_embeds=token,
        plain_embeds=plain,
        target=target,
        added_cond_kwargs=added,
        plain_added_cond_kwargs=plain_added,
    )


def _step(unet, loss_fn, weights=None, **kwargs):
    """One loss and its LoRA gradients; ``weights``: per-sample weights of a ``reduction="none"`` loss."""
    params = lora_parameters(unet)
    for p in params:
        p.grad = None
    out = loss_fn(unet, **kwargs)
    (out.loss if weights is None else (out.loss * weights).sum()).backward()
    return out, [p.grad.clone() for p in params]


def _independent_three_pass(
    peft,
    noisy_latents,
    timesteps,
    token_embeds,
    plain_embeds,
    target,
    cat_weight=1.0,
    added_cond_kwargs=None,
    plain_added_cond_kwargs=None,
    base_embeds=None,
    base_added_cond_kwargs=None,
    plain_unet_kwargs=None,
    reduction="mean",
    **unet_kwargs,
):
    """docs/design.md §1 with peft directly: adapter/token, adapter/plain, disable_adapters()/base."""

    def call(embeds, added, extra):
        kw = {"added_cond_kwargs": added} if added is not None else {}
        return peft(noisy_latents, timesteps, encoder_hidden_states=embeds, return_dict=False, **kw, **extra)[
            0
        ]

    def mse(a, b):
        err = F.mse_loss(a.float(), b.float(), reduction="none")
        return err.mean() if reduction == "mean" else err.mean(dim=(1, 2, 3))

    plain_added = plain_added_cond_kwargs if plain_added_cond_kwargs is not None else added_cond_kwargs
    plain_extra = {**unet_kwargs, **(plain_unet_kwargs or {})}
    ldm = mse(call(token_embeds, added_cond_kwargs, unet_kwargs), target)
    pred_plain = call(plain_embeds, plain_added, plain_extra)
    peft.disable_adapters()
    try:
        with torch.no_grad():
            pred_base = call(
                plain_embeds if base_embeds is None else base_embeds,
                plain_added if base_added_cond_kwargs is None else base_added_cond_kwargs,
                plain_extra,
            )
    finally:
        peft.enable_adapters()
    cat = mse(pred_plain, pred_base)

    class Out:
        loss = ldm + cat_weight * cat

    return Out


def _assert_close(out, grads, ref_out, ref_grads):
    torch.testing.assert_close(out.loss.detach(), ref_out.loss.detach(), rtol=LOSS_RTOL, atol=0)
    assert len(grads) == len(ref_grads) > 0
    for g, r in zip(grads, ref_grads):
        assert r.norm() > 0, "a reference LoRA gradient is zero: the test would not see a wrong one"
        err = ((g - r).norm() / r.norm()).item()
        assert err <= GRAD_RTOL, err


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("mode", ["distinct", "empty", "same_pooled"])
def test_cat_loss_equals_three_pass(family, checkpointing, mode):
    if mode == "same_pooled" and family == "sd":
        pytest.skip("SD1.5 has no pooled conditioning")
    engine, peft = _models(family, checkpointing)
    kwargs = _inputs(engine, family, mode)
    ref_out, ref_grads = _step(engine, cat_loss_reference, **kwargs)
    ind_out, ind_grads = _step(peft, _independent_three_pass, **kwargs)
    _assert_close(ind_out, ind_grads, ref_out, ref_grads)  # the two references agree
    for _ in range(2):  # the second step runs the recompute that skips each unit's frozen tail
        out, grads = _step(engine, cat_loss, **kwargs)
        _assert_close(out, grads, ref_out, ref_grads)
        _assert_close(out, grads, ind_out, ind_grads)
        assert abs(out.ldm.item() - ref_out.ldm.item()) <= LOSS_RTOL * abs(ref_out.ldm.item())
        assert abs(out.cat.item() - ref_out.cat.item()) <= LOSS_RTOL * abs(ref_out.cat.item())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_cat_weight_zero_is_plain_lora(family):
    engine, peft = _models(family, checkpointing=False)
    kwargs = _inputs(engine, family, "distinct")
    ref_out, ref_grads = _step(engine, lambda u, **kw: cat_loss_reference(u, cat_weight=0.0, **kw), **kwargs)
    ind_out, ind_grads = _step(
        peft, lambda u, **kw: _independent_three_pass(u, cat_weight=0.0, **kw), **kwargs
    )
    out, grads = _step(engine, lambda u, **kw: cat_loss(u, cat_weight=0.0, **kw), **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)
    _assert_close(out, grads, ind_out, ind_grads)
    assert out.cat.item() == 0.0


def test_cat_weight_scales_the_cat_term():
    engine, _ = _models("sd", checkpointing=False)
    kwargs = _inputs(engine, "sd", "distinct")
    ref_out, ref_grads = _step(engine, lambda u, **kw: cat_loss_reference(u, cat_weight=0.3, **kw), **kwargs)
    out, grads = _step(engine, lambda u, **kw: cat_loss(u, cat_weight=0.3, **kw), **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)


def test_unfused_unet_runs_the_reference_with_a_warning():
    _, peft = _models("sd", checkpointing=False)
    kwargs = _inputs(peft, "sd", "distinct")
    ref_out, ref_grads = _step(peft, cat_loss_reference, **kwargs)
    import cat_engine.cat.loss as loss_module

    loss_module._warned_unfused = False
    with pytest.warns(UserWarning, match="not fused"):
        out, grads = _step(peft, cat_loss, **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)


@pytest.mark.parametrize("cat_weight", [1.0, 0.0])
def test_batch_loss_and_step_loss_are_cat_loss_on_a_cat_batch(cat_weight):
    """The CatBatch forms the trainer and the VRAM estimator run: the same loss and gradients."""
    engine, _ = _models("sdxl", checkpointing=False)
    kwargs = _inputs(engine, "sdxl", "distinct")
    batch = CatBatch(**kwargs)
    ref_out, ref_grads = _step(engine, lambda u, **kw: cat_loss(u, cat_weight=cat_weight, **kw), **kwargs)
    out, grads = _step(engine, lambda u, **kw: batch_loss(u, batch, cat_weight=cat_weight))
    _assert_close(out, grads, ref_out, ref_grads)
    loss, ldm, cat = step_loss(cat_weight)(engine, batch)
    out = CatLossOutput(loss, ldm, cat)
    _, grads = _step(engine, lambda u: out)
    _assert_close(out, grads, ref_out, ref_grads)
    assert torch.equal(ldm, ref_out.ldm) and torch.equal(cat, ref_out.cat)
    assert ldm.requires_grad is cat.requires_grad is False


# --------------------------------------------------------------------------------------------------
# What trainers need: per-sample losses, the UNet's other arguments, separate base conditioning.
# Each new path against cat_loss_reference and the independent peft three-pass, gradients included.
# --------------------------------------------------------------------------------------------------

CKPT = pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])


def _against_both_references(engine, peft, weights=None, **kwargs):
    ref_out, ref_grads = _step(engine, cat_loss_reference, weights, **kwargs)
    ind_out, ind_grads = _step(peft, _independent_three_pass, weights, **kwargs)
    _assert_close(ind_out, ind_grads, ref_out, ref_grads)
    out, grads = _step(engine, cat_loss, weights, **kwargs)
    _assert_close(out, grads, ref_out, ref_grads)
    torch.testing.assert_close(out.ldm, ref_out.ldm, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(out.cat, ref_out.cat, rtol=LOSS_RTOL, atol=0)
    return out


@CKPT
def test_reduction_none_gives_per_sample_losses(checkpointing):
    engine, peft = _models("sd", checkpointing)
    kwargs = _inputs(engine, "sd", "distinct")
    weights = torch.tensor([0.3, 1.7])  # a caller's min-SNR or loss weights
    out = _against_both_references(engine, peft, weights, reduction="none", cat_weight=0.5, **kwargs)
    assert out.loss.shape == out.ldm.shape == out.cat.shape == (BATCH,)
    assert out.loss.requires_grad and not out.ldm.requires_grad
    torch.testing.assert_close(out.loss.detach(), out.ldm + 0.5 * out.cat)
    mean = cat_loss(engine, cat_weight=0.5, **kwargs)
    torch.testing.assert_close(out.loss.mean(), mean.loss, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(out.cat.mean(), mean.cat, rtol=LOSS_RTOL, atol=0)
    zero = cat_loss(engine, cat_weight=0.0, reduction="none", **kwargs)
    assert zero.loss.shape == (BATCH,) and not zero.cat.any()
    with pytest.raises(ValueError, match="reduction must be one of mean, none"):
        cat_loss(engine, reduction="sum", **kwargs)


@CKPT
def test_other_unet_arguments_pass_through_per_row_group(checkpointing):
    """class_labels and timestep_cond for every group; the plain captions' own attention mask."""
    engine, peft = _models("sd", checkpointing, num_class_embeds=3, time_cond_proj_dim=8)
    kwargs = _inputs(engine, "sd", "distinct")
    g = torch.Generator().manual_seed(7)
    token_mask = torch.ones(BATCH, 77)
    token_mask[:, 20:] = 0
    plain_mask = torch.ones(BATCH, 77)
    plain_mask[:, 12:] = 0
    extra = dict(
        class_labels=torch.tensor([0, 2]),
        timestep_cond=torch.randn(BATCH, 8, generator=g),
        encoder_attention_mask=token_mask,
        plain_unet_kwargs={"encoder_attention_mask": plain_mask},
    )
    labels_only = _against_both_references(engine, peft, **kwargs, class_labels=torch.tensor([1, 1]))
    out = _against_both_references(engine, peft, **kwargs, **extra)
    assert abs(out.ldm.item() - labels_only.ldm.item()) > 1e-4, "the arguments must reach the UNet"
    with pytest.raises(ValueError, match="given for some row groups only"):
        cat_loss(
            engine, **kwargs, class_labels=extra["class_labels"], plain_unet_kwargs=extra["plain_unet_kwargs"]
        )


@CKPT
def test_base_rows_take_their_own_conditioning(checkpointing):
    """A trained text encoder: the base rows see the frozen encoder's embeddings, not the plain rows'."""
    engine, peft = _models("sdxl", checkpointing)
    kwargs = _inputs(engine, "sdxl", "distinct")
    g = torch.Generator().manual_seed(3)
    base = dict(
        base_embeds=kwargs["plain_embeds"] + 0.1 * torch.randn(kwargs["plain_embeds"].shape, generator=g),
        base_added_cond_kwargs={
            "text_embeds": torch.randn(BATCH, 32, generator=g),
            "time_ids": kwargs["added_cond_kwargs"]["time_ids"],
        },
    )
    same = _against_both_references(engine, peft, **kwargs)
    out = _against_both_references(engine, peft, **kwargs, **base)
    assert abs(out.cat.item() - same.cat.item()) > 1e-4 * same.cat.item()


# --------------------------------------------------------------------------------------------------
# LoRA dropout: the same masks in the split batch, in its checkpoint recompute, and in the reference.
# --------------------------------------------------------------------------------------------------


def _feature_dropout(x, p=0.5, training=True, inplace=False):
    """A dropout whose mask depends on the feature index only: every path that applies dropout to
    the same rows draws the same mask, whatever its batch layout (and whatever the RNG does)."""
    if not training or p == 0:
        return x
    k = torch.arange(x.shape[-1], device=x.device)
    keep = ((k * 7919 + x.shape[-1]) % 97) >= round(p * 97)
    return x * keep.to(x.dtype) / (1 - p)


@CKPT
def test_lora_dropout_against_the_three_pass_reference(checkpointing, monkeypatch):
    engine, peft = _models("sd", checkpointing, dropout=0.5)
    engine.train(), peft.train()
    kwargs = _inputs(engine, "sd", "distinct")
    monkeypatch.setattr(torch.nn.functional, "dropout", _feature_dropout)
    masked = _against_both_references(engine, peft, **kwargs)
    monkeypatch.undo()
    engine.eval()
    unmasked = cat_loss(engine, **kwargs)
    assert abs(masked.ldm.item() - unmasked.ldm.item()) > 1e-4, "the dropout must act"


def _dropout_step(engine, kwargs, seed=5):
    torch.manual_seed(seed)
    return _step(engine, cat_loss, **kwargs)


def test_lora_dropout_recompute_draws_the_forward_masks(monkeypatch):
    """Real RNG: the checkpointed split batch replays each unit's RNG state in its recompute, so it
    trains exactly as the no-checkpoint path does with the same seed; without the replay it would not."""
    import cat_engine.engine.split_unet as split_unet

    plain, _ = _models("sd", checkpointing=False, dropout=0.5)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    plain.train(), ckpt.train()
    kwargs = _inputs(plain, "sd", "distinct")
    ref_out, ref_grads = _dropout_step(plain, kwargs)
    out, grads = _dropout_step(ckpt, kwargs)
    _assert_close(out, grads, ref_out, ref_grads)
    other_out, _ = _dropout_step(plain, kwargs, seed=6)
    assert abs(other_out.loss.item() - ref_out.loss.item()) > 1e-4, "the masks must depend on the seed"

    monkeypatch.setattr(split_unet, "_replayed_rng", lambda snapshot, device: contextlib.nullcontext())
    _, unreplayed = _dropout_step(ckpt, kwargs)
    worst = max(((g - r).norm() / r.norm()).item() for g, r in zip(unreplayed, ref_grads))
    assert worst > 1e-2, "without the replay the recompute draws other masks: this test would see it"


def test_model_dropout_outside_lora_layers_is_refused():
    engine, _ = _models("sd", checkpointing=True)
    engine.train()
    engine.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[1].p = 0.1
    with pytest.raises(ValueError, match="model's own dropout off"):
        cat_loss(engine, **_inputs(engine, "sd", "distinct"))


# --------------------------------------------------------------------------------------------------
# Refusals: what the split batch cannot run right is refused with one line that says what to do.
# --------------------------------------------------------------------------------------------------


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_a_ddp_wrapped_unet_is_refused_naming_the_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cat_engine.engine.row_aware import SplitBatchError

    engine, _ = _models("sd", checkpointing=False)
    kwargs = _inputs(engine, "sd", "distinct")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(engine)
        with pytest.raises(SplitBatchError) as exc:
            cat_loss(wrapped, **kwargs)
    finally:
        dist.destroy_process_group()
    message = _one_line(exc)
    assert "DistributedDataParallel" in message and "cat_engine.cat.data_parallel_cat_loss(unet)" in message
    with pytest.raises(SplitBatchError, match="DataParallel"):
        cat_loss(torch.nn.DataParallel(engine), **kwargs)


class PatchingLora(torch.nn.Module):
    """A LoRA in the kohya style: its own down/up weights, installed by replacing the target
    module's ``forward`` with its own (the weights live outside the UNet)."""

    def __init__(self, target: torch.nn.Linear, rank: int = 4, scale: float = 1.0):
        super().__init__()
        self.down = torch.nn.Linear(target.in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, target.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight, std=0.05)
        self.scale, self.multiplier = scale, 1.0
        self.original_forward = target.forward
        target.forward = self.forward

    def delta(self, x):
        return self.up(self.down(x)) * self.scale * self.multiplier

    def forward(self, x):
        return self.original_forward(x) + self.delta(x)


def _patch(unet, cls):
    torch.manual_seed(2)
    targets = [m for n, m in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    return [cls(m) for m in targets]


def test_a_kohya_style_patched_forward_is_refused():
    from cat_engine.engine.row_aware import SplitBatchError

    unet = tiny_unet("sd").requires_grad_(False)
    layers = _patch(unet, PatchingLora)
    kwargs = _inputs(unet, "sd", "distinct")
    with pytest.raises(SplitBatchError) as exc:
        cat_loss(unet, **kwargs)
    message = _one_line(exc)
    assert "forward is replaced" in message and "register_row_aware" in message
    # Plain LoRA training (no base rows) is right with any LoRA: not refused.
    out = cat_loss(unet, cat_weight=0.0, **kwargs)
    out.loss.backward()
    assert layers[0].up.weight.grad is not None


def test_trainable_weights_outside_lora_layers_are_refused():
    from cat_engine.engine.row_aware import SplitBatchError

    engine, _ = _models("sd", checkpointing=False)
    engine.conv_in.weight.requires_grad_(True)
    with pytest.raises(SplitBatchError) as exc:
        cat_loss(engine, **_inputs(engine, "sd", "distinct"))
    assert "trainable parameter conv_in.weight" in _one_line(exc)


@CKPT
def test_a_row_aware_third_party_lora_trains_as_its_three_pass_reference(checkpointing):
    """The protocol of engine/row_aware.py: read split_state(unet).adapter_rows, register the class."""
    from cat_engine.engine import register_row_aware, split_state

    @register_row_aware
    class RowAwarePatchingLora(PatchingLora):
        def forward(self, x):
            rows = self.state.adapter_rows  # None: every row; k: the first k rows only
            out = self.original_forward(x)
            if rows is None:
                return out + self.delta(x)
            return torch.cat([out[:rows] + self.delta(x[:rows]), out[rows:]])

    unet = tiny_unet("sd").requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    layers = _patch(unet, RowAwarePatchingLora)
    for layer in layers:
        layer.state = split_state(unet)
    params = [p for layer in layers for p in layer.parameters()]
    kwargs = _inputs(unet, "sd", "distinct")

    def grads_of(loss):
        for p in params:
            p.grad = None
        loss.backward()
        return [p.grad.clone() for p in params]

    out = cat_loss(unet, **kwargs)
    grads = grads_of(out.loss)
    # The reference: three plain calls, the base one with every layer's multiplier at 0.
    z, t, target = kwargs["noisy_latents"], kwargs["timesteps"], kwargs["target"]

    def call(embeds):
        return unet(z, t, encoder_hidden_states=embeds, return_dict=False)[0]

    ldm = F.mse_loss(call(kwargs["token_embeds"]), target)
    pred_plain = call(kwargs["plain_embeds"])
    for layer in layers:
        layer.multiplier = 0.0
    with torch.no_grad():
        pred_base = call(kwargs["plain_embeds"])
    for layer in layers:
        layer.multiplier = 1.0
    cat = F.mse_loss(pred_plain, pred_base)
    ref_grads = grads_of(ldm + cat)
    assert cat.item() > 1e-8, "the adapter must change the plain rows for this test to mean anything"
    _assert_close(out, grads, CatLossOutput(ldm + cat, ldm.detach(), cat.detach()), ref_grads)


def test_plain_caption_is_exported():
    from cat_engine.cat import plain_caption

    assert plain_caption("a photo of sks dog", "sks", "dog") == "a photo of dog"
