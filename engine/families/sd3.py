"""Stable Diffusion 3 and 3.5 (``SD3Transformer2DModel``, MMDiT: joint text-image attention).

Conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` builds it: the penultimate hidden states
of the two CLIP encoders side by side, zero-padded to the T5 width and followed by the T5 tokens
(``[N, 77 + 256, 4096]``), and the two CLIP projections side by side as the pooled text
(``pooled_projections``, ``[N, 2048]``). Without a T5 encoder the T5 part is zeros, as in the pipeline.

Training recipe (diffusers' ``train_dreambooth_lora_sd3.py``): logit-normal ``u`` indexing the
folder's statically shifted sigma table (``shift=3.0`` in SD3's scheduler config); LoRA on the
attention projections of both streams. The script's optional output preconditioning (an x_0 target,
which weighs the loss by sigma squared) is not used: the engine's target is the velocity, as for
every flow family. The transformer takes ``timestep = 1000 * sigma``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cat_engine.engine.families import flow
from cat_engine.engine.families.base import DitFamily, per_row, tokenize


class SD3Family(DitFamily):
    name = "sd3"
    title = "SD3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    block_classes = ("JointTransformerBlock",)
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    default_targets = (
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    )
    max_sequence_length = 256
    sample_guidance = 7.0
    default_max_shift = 1.16  # StableDiffusion3Pipeline's default where the config has none

    @torch.no_grad()
    def encode_batch(self, model, prompts: list[str]):
        from cat_engine.engine.text import PromptEmbeds

        hidden, pooled = [], []
        for tokenizer, encoder in zip(model.tokenizers[:2], model.text_encoders[:2]):
            ids = tokenize(tokenizer, prompts, tokenizer.model_max_length, encoder.device)["input_ids"]
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0].float())  # CLIPTextModelWithProjection: the projected pooled text
            hidden.append(out.hidden_states[-2].float())
        clip = torch.cat(hidden, dim=-1)
        tokenizer, t5 = model.tokenizers[2], model.text_encoders[2]
        length = (
            min(self.max_sequence_length, tokenizer.model_max_length)
            if tokenizer
            else self.max_sequence_length
        )
        if t5 is None:
            width = model.unet.config.joint_attention_dim
            t5_embeds = torch.zeros(len(prompts), length, width, device=clip.device)
        else:
            ids = tokenize(tokenizer, prompts, length, t5.device)["input_ids"]
            t5_embeds = t5(ids)[0].float().to(clip.device)
        clip = F.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return PromptEmbeds(torch.cat([clip, t5_embeds], dim=-2), torch.cat(pooled, dim=-1))

    def conditioning(self, prompt) -> dict:
        return {"pooled_projections": prompt.pooled}

    def example_prompt(self, config, rows, text_tokens, make):
        from cat_engine.engine.text import PromptEmbeds

        clip_tokens = 77
        embeds = make((rows, clip_tokens + text_tokens, config["joint_attention_dim"]))
        return PromptEmbeds(embeds, make((rows, config["pooled_projection_dim"])))

    def forward(self, transformer, latents, timesteps, embeds, cond, **kwargs):
        t = per_row(timesteps, latents.shape[0], latents)
        return transformer(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=embeds,
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
            **kwargs,
        )[0]

    def training_sigmas(self, scheduler_config, n, generator, latent_shape):
        return flow.table_sigmas(scheduler_config, flow.logit_normal_u(n, generator))

    def image_seq_len(self, transformer, latent_shape) -> int:
        p = transformer.config.patch_size
        return (latent_shape[-2] // p) * (latent_shape[-1] // p)


SD3 = SD3Family()
