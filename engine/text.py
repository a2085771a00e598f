"""Prompt encoding for SD1.x/SD2.x (one CLIP text encoder) and SDXL (two, plus pooled output)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    """``embeds`` ``[B, 77, D]``; ``pooled`` ``[B, P]`` for SDXL, else ``None``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, index) -> PromptEmbeds:
        return PromptEmbeds(self.embeds[index], None if self.pooled is None else self.pooled[index])


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def encode_prompts(model, prompts: list[str], batch_size: int = 64, *, grad: bool = False) -> PromptEmbeds:
    """Encode prompts with the model's text encoder(s), in batches; float32 results on the encoder device.

    SD: the last hidden state of the one encoder. SDXL: the penultimate hidden states of both
    encoders, concatenated, plus the second encoder's pooled projection (as diffusers' SDXL
    pipeline does). ``grad``: keep the autograd graph (a text encoder being trained).
    """
    with torch.set_grad_enabled(grad):
        return _encode(model, prompts, batch_size)


def _encode(model, prompts: list[str], batch_size: int) -> PromptEmbeds:
    if not model.text_encoders:
        raise RuntimeError("text encoders were released; encode prompts before release_encoders()")
    chunks_e, chunks_p = [], []
    for start in range(0, len(prompts), batch_size):
        part = list(prompts[start : start + batch_size])
        if model.family == "sd":
            encoder = model.text_encoders[0]
            out = encoder(_tokenize(model.tokenizers[0], part, encoder.device))
            chunks_e.append(out[0].float())
            continue
        hidden = []
        pooled = None
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
            out = encoder(_tokenize(tokenizer, part, encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            if hasattr(out, "text_embeds"):
                pooled = out.text_embeds.float()
        chunks_e.append(torch.cat(hidden, dim=-1))
        chunks_p.append(pooled)
    embeds = torch.cat(chunks_e)
    pooled = torch.cat(chunks_p) if chunks_p else None
    return PromptEmbeds(embeds, pooled)


def sdxl_time_ids(resolution: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left (0, 0), target size."""
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return ids.expand(batch, 6).contiguous()


def added_cond(prompt: PromptEmbeds, resolution: int) -> dict | None:
    """``added_cond_kwargs`` for an SDXL UNet call, ``None`` for SD."""
    if prompt.pooled is None:
        return None
    b = prompt.pooled.shape[0]
    return {"text_embeds": prompt.pooled, "time_ids": sdxl_time_ids(resolution, b, prompt.pooled.device)}
