"""Flux.1 (``FluxTransformer2DModel``: double-stream blocks, then single-stream blocks).

Conditioning, as ``FluxPipeline.encode_prompt`` builds it: the T5 tokens (``[N, 512, 4096]``) and the
CLIP pooled output (``pooled_projections``, ``[N, 768]``); for the guidance-distilled dev model also
the guidance value (``guidance``, ``[N]``). Latents are packed into 2x2 patches
(``[N, h*w/4, 4C]``) with their position ids, and unpacked again, inside :meth:`FluxFamily.forward`:
the rest of the engine sees ``[N, C, h, w]`` like every other family. The position ids and the
rotary table are the same for every row and are made from shapes there.

Training recipe: logit-normal ``u`` shifted by the image's token count (``mu`` linear between the
scheduler config's ``base_shift`` at ``base_image_seq_len`` and ``max_shift`` at
``max_image_seq_len``, then the scheduler's exponential time shift): Flux's resolution-dependent
shift. LoRA targets: those of diffusers' ``train_dreambooth_lora_flux.py`` (attention of both
streams and the double blocks' feed-forwards). Flux.1-dev is guidance-distilled and is trained at
the fixed guidance :data:`TRAIN_GUIDANCE`, the default of diffusers' script and of kohya's
sd-scripts, and the value the pipeline samples with, so the CAT term holds the adapter to the base
model where it is used; schnell has no guidance input. Sampling uses the embedded guidance and no
classifier-free guidance, as the pipeline does.
"""

from __future__ import annotations

import numpy as np
import torch

from cat_engine.engine.families import flow
from cat_engine.engine.families.base import DitFamily, per_row, tokenize

TRAIN_GUIDANCE = 3.5  # the guidance embedding's value in training (guidance-distilled models)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` -> ``[N, h*w/4, 4C]`` (2x2 patches), as ``FluxPipeline`` packs them."""
    from diffusers import FluxPipeline

    n, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, n, c, h, w)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` for latents of ``h x w``."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed, h, w, 1)  # scale factor 1: h, w are latent pixels


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


class FluxFamily(DitFamily):
    name = "flux"
    title = "Flux.1"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    encoder_names = ("text_encoder", "text_encoder_2")
    default_targets = (
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    )
    position_modules = ("FluxPosEmbed",)
    max_sequence_length = 512
    sample_guidance = 3.5

    @torch.no_grad()
    def encode_batch(self, model, prompts: list[str]):
        from cat_engine.engine.text import PromptEmbeds

        clip_tok, t5_tok = model.tokenizers
        clip, t5 = model.text_encoders
        ids = tokenize(clip_tok, prompts, clip_tok.model_max_length, clip.device)["input_ids"]
        pooled = clip(ids, output_hidden_states=False).pooler_output.float()
        length = min(self.max_sequence_length, t5_tok.model_max_length)
        ids = tokenize(t5_tok, prompts, length, t5.device)["input_ids"]
        embeds = t5(ids, output_hidden_states=False)[0].float()
        return PromptEmbeds(embeds, pooled.to(embeds.device))

    def conditioning(self, prompt) -> dict:
        return {"pooled_projections": prompt.pooled}

    def latent_channels(self, config) -> int:
        return int(config["in_channels"]) // 4  # packed 2x2

    def example_prompt(self, config, rows, text_tokens, make):
        from cat_engine.engine.text import PromptEmbeds

        embeds = make((rows, text_tokens, config["joint_attention_dim"]))
        return PromptEmbeds(embeds, make((rows, config["pooled_projection_dim"])))

    def forward(self, transformer, latents, timesteps, embeds, cond, **kwargs):
        n, _, h, w = latents.shape
        t = per_row(timesteps, n, latents).to(latents.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = cond.get("guidance")
            if guidance is None:
                guidance = torch.full((n,), TRAIN_GUIDANCE, device=latents.device, dtype=torch.float32)
        out = transformer(
            hidden_states=pack(latents),
            timestep=t / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=embeds.device, dtype=embeds.dtype),
            img_ids=image_ids(h, w, latents.device, embeds.dtype),
            return_dict=False,
            **kwargs,
        )[0]
        return unpack(out, h, w)

    def training_sigmas(self, scheduler_config, n, generator, latent_shape):
        u = flow.logit_normal_u(n, generator)
        return flow.time_shift(self.mu(scheduler_config, self.image_seq_len(None, latent_shape)), u)

    def set_timesteps(self, scheduler, steps, latent_shape, transformer, device) -> None:
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = self.mu(scheduler.config, self.image_seq_len(transformer, latent_shape))
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def uses_cfg(self, transformer, guidance: float) -> bool:
        return False  # the pipeline's true CFG is off unless a negative prompt and true_cfg_scale are given

    def sample_conditioning(self, transformer, guidance, rows, device) -> dict:
        if not transformer.config.guidance_embeds:
            return {}
        return {"guidance": torch.full((rows,), float(guidance), device=device, dtype=torch.float32)}


FLUX = FluxFamily()
