"""--train-text-encoder on the built-in tiny models: one step against a three-pass reference, resume,
the saved files (diffusers and kohya) in diffusers, eval's loading, and the refusals."""

import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import IDENTITY, ConfigError, TrainConfig
from cat_engine.cat.eval import load_adapted_model
from cat_engine.cat.loss import mse
from cat_engine.cat.text_encoder_lora import (
    TextEncoderLoraError,
    check_text_encoder_training,
    frozen_text,
    text_encoder_lora_parameters,
)
from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import LORA_WEIGHT_NAME, adapters_disabled, lora_named_parameters
from cat_engine.engine.memory_plan import MemoryPlan
from cat_engine.engine.run_folder import RunFolderError
from cat_engine.engine.text import PromptEmbeds, encode_prompts

FAST = dict(
    rank=4, batch_size=2, save_every=0, lr=1e-3, train_text_encoder=True, memory=MemoryPlan(precision="fp32")
)


def _config(tmp_path, family="sd", name="run", **overrides) -> TrainConfig:
    base = str(builtin_model_dir(family, pretrained=False))
    return TrainConfig(base=base, output=str(tmp_path / name), **{**FAST, "steps": 2, **overrides}).validate()


def _randomise(params, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapted_trainer(tmp_path, family="sd", **overrides):
    """A trainer whose UNet and text-encoder adapters are random (so adapted != frozen everywhere)."""
    trainer = train_mod.Trainer.setup(_config(tmp_path, family, **overrides))
    _randomise(trainer.lora.values(), 1, 0.1)
    return trainer


def _conditioning(out: PromptEmbeds, batch, resolution_ids):
    if out.pooled is None:
        return None
    return {"text_embeds": out.pooled, "time_ids": resolution_ids}


def _three_pass_loss(trainer, drawn, cat_weight):
    """Three model calls: adapted UNet + adapted encoder on the token captions, the same on the plain
    captions, frozen UNet + frozen encoder on the plain captions (no cache involved)."""
    model, unet, b = trainer.model, trainer.model.unet, drawn.batch
    time_ids = None if b.added_cond_kwargs is None else b.added_cond_kwargs["time_ids"]
    token = encode_prompts(model, drawn.token_captions, grad=True)
    plain = encode_prompts(model, drawn.plain_captions, grad=True)
    with torch.no_grad(), frozen_text(model):
        base = encode_prompts(model, drawn.plain_captions)
    z, t = b.noisy_latents, b.timesteps
    pred_token = unet_forward(unet, z, t, token.embeds, _conditioning(token, b, time_ids))
    pred_plain = unet_forward(unet, z, t, plain.embeds, _conditioning(plain, b, time_ids))
    with torch.no_grad(), adapters_disabled(unet):
        pred_base = unet_forward(unet, z, t, base.embeds, _conditioning(base, b, time_ids))
    ldm, cat = mse(pred_token, b.target), mse(pred_plain, pred_base)
    return ldm + cat_weight * cat, ldm, cat


def _grads(trainer, loss):
    for p in trainer.lora.values():
        p.grad = None
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.lora.items()}


@pytest.mark.parametrize(
    "family, options",
    [("sd", {}), ("sd", {"shuffle_caption": True}), ("sdxl", {})],
    ids=["sd", "sd-captions-encoded-each-step", "sdxl"],
)
def test_one_step_matches_the_three_pass_reference(tmp_path, family, options):
    trainer = _adapted_trainer(tmp_path, family, cat_weight=0.7, **options)
    try:
        te = text_encoder_lora_parameters(trainer.model)
        assert te and set(te) <= set(trainer.lora)  # optimised, clipped and saved with the UNet's
        assert len({p.data_ptr() for g in trainer.optimizer.param_groups for p in g["params"]}) == len(
            trainer.lora
        )
        (drawn,) = trainer.draw()
        step = getattr(trainer.step_fn, "module", trainer.step_fn)
        step.loss_fn = trainer.step_losses[True]
        loss, ldm, cat = trainer.step_fn(drawn)
        fast = _grads(trainer, loss)
        ref_loss, ref_ldm, ref_cat = _three_pass_loss(trainer, drawn, cat_weight=0.7)
        ref = _grads(trainer, ref_loss)
    finally:
        trainer.close()
    assert cat > 1e-6  # the base rows differ from the plain rows: the comparison means something
    for got, want in ((loss, ref_loss), (ldm, ref_ldm), (cat, ref_cat)):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-7)
    assert fast.keys() == ref.keys()
    for name in ref:
        err = (fast[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"
    assert all(ref[n].norm() > 0 for n in te), "every text-encoder LoRA tensor must get a gradient"


def test_resume_is_bit_exact_with_the_text_encoder(tmp_path):
    def run(name, steps, **kw):
        return train_mod.train(_config(tmp_path, name=name, steps=steps, lr=1e-2, **kw), progress=False)

    straight = load_file(str(run("straight", 4)))
    run("split", 2, save_every=1)
    ckpt_lora = load_file(str(tmp_path / "split" / "checkpoints" / "step-2" / "lora.safetensors"))
    assert any(k.startswith("text_encoder.") for k in ckpt_lora)
    resumed = load_file(str(run("split", 4, resume="latest")))
    assert any(k.startswith("text_encoder.") for k in straight) and straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    te_b = [v for k, v in straight.items() if k.startswith("text_encoder.") and "lora_B" in k]
    assert any(v.abs().max() > 0 for v in te_b), "training must move the text encoder's adapter"


def _encode(encoder, tokenizer, prompts=("a photo of sks star", "a star")):
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_saved_files_load_in_diffusers_and_change_the_text_encoders(tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    trainer = _adapted_trainer(tmp_path, family, alpha=8)  # alpha != rank: the files must carry it
    try:
        model = trainer.model
        diffusers_file, kohya_file = trainer.write_lora(tmp_path / "files")
        adapted = [_encode(e, t) for e, t in zip(model.text_encoders, model.tokenizers)]
        with frozen_text(model):
            frozen = [_encode(e, t) for e, t in zip(model.text_encoders, model.tokenizers)]
    finally:
        trainer.close()
    prefixes = ["text_encoder", "text_encoder_2"][: len(adapted)]
    with safe_open(str(diffusers_file), framework="pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"unet", *prefixes}
    for file in (diffusers_file, kohya_file):
        pipe = pipeline_cls.from_pretrained(trainer.config.base, local_files_only=True)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
        for i, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
            loaded = _encode(encoder, tokenizer)
            assert not torch.allclose(frozen[i], adapted[i], atol=1e-3)
            torch.testing.assert_close(
                loaded, adapted[i], rtol=1e-5, atol=1e-5, msg=f"{file.name} encoder {i}"
            )


def test_kohya_text_encoder_keys_and_alphas(tmp_path):
    trainer = _adapted_trainer(tmp_path, "sdxl", alpha=8, save_format="kohya")
    try:
        (kohya_file,) = trainer.write_lora(tmp_path / "files")
        layers = {
            prefix: len({n.split(".self_attn")[0] for n in lora_named_parameters(e)})
            for prefix, e in zip(("lora_te1_", "lora_te2_"), trainer.model.text_encoders)
        }
        peft = text_encoder_lora_parameters(trainer.model)
    finally:
        trainer.close()
    state = load_file(str(kohya_file))
    expected = {
        f"{prefix}text_model_encoder_layers_{i}_self_attn_{proj}.{part}"
        for prefix, n in layers.items()
        for i in range(n)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert {k for k in state if k.startswith("lora_te")} == expected
    assert {state[k].item() for k in expected if k.endswith(".alpha")} == {8.0}
    assert any(k.startswith("lora_unet_") for k in state)
    down = state["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    (name,) = [
        n for n in peft if n.startswith("text_encoder_2.") and ".layers.0.self_attn.q_proj.lora_A" in n
    ]
    assert torch.equal(down, peft[name].detach())


def test_eval_loads_the_text_encoder_weights_or_refuses_in_one_line(tmp_path):
    trainer = _adapted_trainer(tmp_path)
    try:
        (lora,) = trainer.write_lora(tmp_path / "files")[:1]
        model = trainer.model
        adapted = _encode(model.text_encoders[0], model.tokenizers[0])
        with frozen_text(model):
            frozen = _encode(model.text_encoders[0], model.tokenizers[0])
    finally:
        trainer.close()
    loaded = load_adapted_model(trainer.config.base, lora, "float32", torch.device("cpu"))
    torch.testing.assert_close(_encode(loaded.text_encoders[0], loaded.tokenizers[0]), adapted)
    with frozen_text(loaded):  # the base rows of eval's samples
        torch.testing.assert_close(_encode(loaded.text_encoders[0], loaded.tokenizers[0]), frozen)

    state = load_file(str(lora))
    moved = {k.replace("text_encoder.", "text_encoder_2.", 1): v for k, v in state.items()}
    save_file(moved, str(tmp_path / "two.safetensors"))
    with pytest.raises(
        TextEncoderLoraError, match=r"text_encoder_2 weights, and this --base has 1 text encoder"
    ):
        load_adapted_model(trainer.config.base, tmp_path / "two.safetensors", "float32", torch.device("cpu"))


def test_refused_for_transformer_families_and_cuda_graphs():
    with pytest.raises(TextEncoderLoraError, match="--train-text-encoder: for SD1.x/2.x and SDXL only"):
        check_text_encoder_training(types.SimpleNamespace(family="flux"))
    check_text_encoder_training(types.SimpleNamespace(family="sdxl"))
    with pytest.raises(ConfigError, match="--cuda-graphs .* --train-text-encoder"):
        TrainConfig(train_text_encoder=True, cuda_graphs=True).validate()
    assert "train_text_encoder" in IDENTITY


def test_a_run_without_the_text_encoder_does_not_resume_with_it(tmp_path):
    train_mod.train(_config(tmp_path, steps=1, train_text_encoder=False), progress=False)
    with pytest.raises(RunFolderError, match=r"train_text_encoder: False -> True") as info:
        train_mod.train(_config(tmp_path, steps=2, resume="latest"), progress=False)
    assert "\n" not in str(info.value)
    assert LORA_WEIGHT_NAME in {p.name for p in (tmp_path / "run").iterdir()}
