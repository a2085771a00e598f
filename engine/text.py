"""Prompt encoding for SD1.x/SD2.x (one CLIP text encoder) and SDXL (two, plus pooled output).

The diffusion-transformer families encode as their own pipelines do (``engine/families/``):
:func:`encode_prompts` hands them the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cat_engine.engine.families import dit_family


@dataclass
class PromptEmbeds:
    """``embeds`` ``[B, L, D]`` (L = 77 for SD/SDXL); ``pooled`` ``[B, P]`` for SDXL, SD3 and Flux,
    else ``None``; ``mask`` ``[B, L]`` bool for families whose text has a length per prompt (Z-Image:
    the padding is not attended), else ``None``."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def map(self, fn) -> PromptEmbeds:
        """``fn`` applied to every tensor present."""
        return PromptEmbeds(*(None if t is None else fn(t) for t in (self.embeds, self.pooled, self.mask)))

    def rows(self, index) -> PromptEmbeds:
        return self.map(lambda t: t[index])

    @staticmethod
    def concat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        """The parts' rows one after the other. Masked parts of different lengths are padded to the
        longest (zeros, masked out)."""
        if parts[0].mask is not None:
            length = max(p.embeds.shape[1] for p in parts)
            parts = [p._padded(length) for p in parts]
        first = parts[0]
        return PromptEmbeds(
            *(
                None if getattr(first, f) is None else torch.cat([getattr(p, f) for p in parts])
                for f in ("embeds", "pooled", "mask")
            )
        )

    def _padded(self, length: int) -> PromptEmbeds:
        extra = length - self.embeds.shape[1]
        if extra == 0:
            return self
        embeds = torch.nn.functional.pad(self.embeds, (0, 0, 0, extra))
        return PromptEmbeds(embeds, self.pooled, torch.nn.functional.pad(self.mask, (0, extra), value=False))


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
    family = dit_family(model.family)
    if family is not None:
        return family.encode_prompts(model, prompts, batch_size)
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


# The CLIP text model's modules as LoRA files name them (diffusers and kohya, written with
# transformers' ``CLIPTextModel.text_model``); recent transformers flatten that level away.
CLIP_ROOT = "text_model."


def clip_module_path(path: str) -> str:
    """``path`` of a CLIP text encoder's module from the ``text_model`` root, whichever layout
    the installed transformers has."""
    return path if path.startswith(CLIP_ROOT) else CLIP_ROOT + path


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
