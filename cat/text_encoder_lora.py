"""Text-encoder LoRA (``--train-text-encoder``): adapters on the CLIP encoder(s), with CAT kept exact.

The rows of a CAT step see three conditionings (docs/design.md §1):

- token rows (LDM term): the *adapted* encoder's embedding of the token caption;
- plain rows (CAT term, adapter side): the *adapted* encoder's embedding of the plain caption;
- base rows (CAT term, target): the *frozen* encoder's embedding of the plain caption — the frozen
  model is the UNet and the text encoder without their adapters.

The adapted embeddings are computed every step, with gradients into the encoder's LoRA, inside the
training step (:func:`adapted_text_loss`: under DDP the encoders' LoRA is reduced with the UNet's);
the frozen ones are the cached embeddings (computed before the adapter was added), or, when
captions change per step, the encoder run with its adapter disabled (``cat.data.LiveText``).

The adapters are peft's, put in with ``peft.inject_adapter_in_model`` rather than transformers'
``add_adapter`` (whose peft version check refuses some installed pairs); they are switched off
layer by layer (:func:`frozen_text`). Saved files use the keys diffusers' ``load_lora_weights``
reads (``text_encoder[_2].text_model....lora_A.weight``) and sd-scripts' (``lora_te[1|2]_...``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import torch

from cat_engine.engine.batch import CatBatch
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import dit_family
from cat_engine.engine.lora import (
    DIFFUSERS_METADATA_KEY,
    ExtraAdapters,
    has_peft_adapter,
    lora_config_dict,
    lora_named_parameters,
)
from cat_engine.engine.text import CLIP_ROOT, clip_module_path, encode_prompts

# The CLIP attention projections, as diffusers' DreamBooth-LoRA scripts target them.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Key prefixes diffusers' load_lora_weights reads, per encoder.
PREFIXES = ("text_encoder", "text_encoder_2")
FLAG = "--train-text-encoder"


class TextEncoderLoraError(CatEngineError):
    """A text-encoder LoRA that cannot be trained or loaded here; the message says why."""


def check_text_encoder_training(model) -> None:
    """Refuse :data:`FLAG` for a model whose text encoders are not CLIP's (the transformer families)."""
    family = dit_family(model.family)
    if family is not None:
        raise TextEncoderLoraError(
            f"{FLAG}: for SD1.x/2.x and SDXL only; {family.title}'s text encoders are not trained here"
        )


def _lora_config(rank: int, alpha: float | None, targets=TEXT_ENCODER_TARGETS, **more):
    from peft import LoraConfig

    alpha = float(rank if alpha is None else alpha)
    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets), **more
    )


def _layers(model, index: int, encoder) -> dict:
    """Which layers of encoder ``index`` get an adapter (peft's ``LoraConfig`` keys): all, except
    SDXL's first encoder's last one, which no loss reaches (SDXL reads the penultimate hidden
    states; the second encoder's last layer still feeds the pooled embedding)."""
    if model.family != "sdxl" or index != 0:
        return {}
    last = encoder.config.num_hidden_layers - 1
    return {"layers_to_transform": list(range(last)), "layers_pattern": "layers"}


def add_text_encoder_lora(model, rank: int, alpha: float | None, seed: int) -> None:
    """A trainable LoRA adapter on each of ``model``'s text encoders (seeded apart from the UNet's).

    ``lora_B`` starts at zero, so the adapted encoders start equal to the frozen ones. Every
    adapted tensor gets a gradient each step (:func:`_layers`), as DDP needs.
    """
    from peft import inject_adapter_in_model

    for i, encoder in enumerate(model.text_encoders):
        encoder.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1 + i)
            inject_adapter_in_model(_lora_config(rank, alpha, **_layers(model, i, encoder)), encoder)


def text_encoder_lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trained text-encoder tensors, by ``text_encoder[_2].<module>`` name (none without adapters)."""
    return {
        f"{prefix}.{name}": p
        for prefix, encoder in zip(PREFIXES, model.text_encoders)
        for name, p in lora_named_parameters(encoder).items()
    }


def has_text_adapter(model) -> bool:
    """Whether any of ``model``'s text encoders carries a LoRA adapter."""
    return any(has_peft_adapter(e) for e in model.text_encoders)


def _tuner_layers(encoder) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in encoder.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def frozen_text(model):
    """``model``'s text encoders as the base model has them: their adapters disabled for the block."""
    layers = [layer for encoder in model.text_encoders for layer in _tuner_layers(encoder)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# ------------------------------------------------------------------------------ each step
def adapted_batch(model, drawn) -> CatBatch:
    """``drawn.batch`` (a :class:`~cat_engine.cat.data.DrawnBatch`'s, with the frozen embeddings)
    with its token and plain rows conditioned on the adapted encoders' embeddings of
    ``drawn.token_captions`` and ``drawn.plain_captions`` (one encoder call, with gradients); the
    frozen plain embeddings move to the base rows."""
    b = drawn.batch
    n = len(drawn.token_captions)
    out = encode_prompts(model, [*drawn.token_captions, *drawn.plain_captions], grad=True)
    token, plain = out.rows(slice(0, n)), out.rows(slice(n, 2 * n))
    added = plain_added = None
    if token.pooled is not None:  # SDXL: the pooled text is the adapted encoder's too
        added = {**b.added_cond_kwargs, "text_embeds": token.pooled}
        plain_added = {**b.plain_conditioning, "text_embeds": plain.pooled}
    base_embeds, base_added = b.base_conditioning
    return dataclasses.replace(
        b,
        token_embeds=token.embeds,
        plain_embeds=plain.embeds,
        added_cond_kwargs=added,
        plain_added_cond_kwargs=plain_added,
        base_embeds=base_embeds,
        base_added_cond_kwargs=base_added,
    )


def adapted_text_loss(loss_fn, model):
    """The step loss ``loss_fn(unet, batch)`` of a :class:`~cat_engine.cat.data.DrawnBatch`: its
    batch conditioned by :func:`adapted_batch` first, so the encoders run inside the step."""
    return functools.partial(_adapted_loss, loss_fn=loss_fn, model=model)


def _adapted_loss(unet, drawn, loss_fn, model):
    return loss_fn(unet, adapted_batch(model, drawn))


# ------------------------------------------------------------------------------- files
def text_encoder_adapters(model) -> ExtraAdapters | None:
    """The encoders' LoRA for the saved files (``engine/lora.save_lora_files``); ``None`` without one."""
    from peft.utils import get_peft_model_state_dict

    from cat_engine.engine.kohya import kohya_text_encoder_state_dict

    adapted = [(p, e) for p, e in zip(PREFIXES, model.text_encoders) if has_peft_adapter(e)]
    if not adapted:
        return None
    tensors = {
        f"{prefix}.{clip_module_path(key)}": t.detach().to("cpu", torch.float32).contiguous()
        for prefix, encoder in adapted
        for key, t in get_peft_model_state_dict(encoder).items()
    }
    configs = {p: {**lora_config_dict(e), **_layers(model, PREFIXES.index(p), e)} for p, e in adapted}
    return ExtraAdapters(tensors, configs, kohya_text_encoder_state_dict([e for _, e in adapted]))


def load_text_encoder_lora(model, path: Path) -> int:
    """Put the text-encoder LoRA of the diffusers-format file ``path`` (if any) into ``model``'s
    encoders; returns how many encoders got one. Raises :class:`TextEncoderLoraError` for weights
    this model has no encoder for, or that do not fit it."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = [k for k in f.keys() if k.split(".")[0] in PREFIXES]
        tensors = {k: f.get_tensor(k) for k in keys}
        configs = json.loads((f.metadata() or {}).get(DIFFUSERS_METADATA_KEY) or "{}")
    loaded = 0
    for i, prefix in enumerate(PREFIXES):
        state = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.split(".")[0] == prefix}
        if not state:
            continue
        if i >= len(model.text_encoders):
            raise TextEncoderLoraError(
                f"--lora {path}: it has {prefix} weights, and this --base has {len(model.text_encoders)} text encoder(s)"
            )
        encoder = model.text_encoders[i]
        if not hasattr(encoder, CLIP_ROOT.rstrip(".")):  # recent transformers: no text_model level
            state = {k.removeprefix(CLIP_ROOT): v for k, v in state.items()}
        config = {k.removeprefix(prefix + "."): v for k, v in configs.items() if k.startswith(prefix + ".")}
        rank = next(v.shape[0] for k, v in state.items() if "lora_A" in k)
        targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in state})
        more = {k: config[k] for k in ("layers_to_transform", "layers_pattern") if k in config}
        rank, alpha = config.get("r", rank), config.get("lora_alpha")
        inject_adapter_in_model(
            _lora_config(rank, alpha, config.get("target_modules", targets), **more), encoder
        )
        result = set_peft_model_state_dict(encoder, state)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if unexpected:
            raise TextEncoderLoraError(
                f"--lora {path}: {len(unexpected)} {prefix} weights fit no module of this --base (e.g. {unexpected[0]})"
            )
        loaded += 1
    return loaded
