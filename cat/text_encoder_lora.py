"""Text-encoder LoRA (``--train-text-encoder``): adapters on the CLIP encoder(s), with CAT kept exact.

The rows of a CAT step see three conditionings (docs/design.md §1):

- token rows (LDM term): the *adapted* encoder's embedding of the token caption;
- plain rows (CAT term, adapter side): the *adapted* encoder's embedding of the plain caption;
- base rows (CAT term, target): the *frozen* encoder's embedding of the plain caption — the frozen
  model is the UNet and the text encoder without their adapters.

The adapted embeddings are computed every step, with gradients into the encoder's LoRA; the
frozen ones are the cached embeddings (computed before the adapter was added), or, when
captions change per step, the encoder run with its adapter disabled (``cat.data.LiveText``).
"""

from __future__ import annotations

import contextlib

import torch

from cat_engine.engine.lora import adapters_disabled, add_lora, has_peft_adapter, lora_named_parameters
from cat_engine.engine.text import PromptEmbeds, encode_prompts

# The CLIP attention projections, as diffusers' DreamBooth-LoRA scripts target them.
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Key prefixes diffusers' load_lora_weights reads, per encoder.
PREFIXES = ("text_encoder", "text_encoder_2")


def add_text_encoder_lora(model, rank: int, alpha: float | None, seed: int) -> None:
    """A trainable LoRA adapter on each of ``model``'s text encoders (seeded apart from the UNet's)."""
    for i, encoder in enumerate(model.text_encoders):
        add_lora(encoder, rank, alpha, TEXT_ENCODER_TARGETS, seed=seed + 1 + i)
        encoder.train()


def text_encoder_lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trained text-encoder tensors, by ``text_encoder[_2].<module>`` name."""
    return {
        f"{prefix}.{name}": p
        for prefix, encoder in zip(PREFIXES, model.text_encoders)
        for name, p in lora_named_parameters(encoder).items()
    }


class AdaptedText:
    """Each step's adapter-row embeddings from the adapted encoders, with gradients."""

    def __init__(self, model, autocast):
        self.model = model
        self.autocast = autocast

    def lookup(self, captions: list[str]) -> PromptEmbeds:
        with self.autocast():
            out = encode_prompts(self.model, captions, grad=True)
        return PromptEmbeds(out.embeds.float(), None if out.pooled is None else out.pooled.float())


def has_text_adapter(model) -> bool:
    """Whether any of ``model``'s text encoders carries a LoRA adapter."""
    return any(has_peft_adapter(e) for e in model.text_encoders)


@contextlib.contextmanager
def frozen_text(model):
    """``model``'s text encoders as the base model has them: their adapters disabled for the block."""
    with contextlib.ExitStack() as stack:
        for encoder in model.text_encoders:
            if has_peft_adapter(encoder):
                stack.enter_context(adapters_disabled(encoder))
        yield model
