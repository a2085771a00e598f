"""Z-Image and Z-Image-Turbo (``ZImageTransformer2DModel``: a single-stream DiT, S3-DiT).

Why this one of the newest families (README, "Diffusion transformers"): every maintained trainer
added LoRA training for it within days of its release (ai-toolkit, OneTrainer, musubi-tuner,
diffusion-pipe, DiffSynth-Studio), hosted trainers offer it next to Flux, and its 6 B parameters
train on a 12 GB card, where CAT's extra rows matter most.

Conditioning, as ``ZImagePipeline.encode_prompt`` builds it: the prompt in the tokenizer's chat
template, the LLM text encoder's penultimate hidden states, and only the prompt's own tokens (the
padding is dropped). Here the embeddings stay padded, ``[N, L, 2560]``, with the mask of real tokens
(``text_mask``, ``[N, L]``): :meth:`ZImageFamily.forward` hands the transformer each row's tokens
as the pipeline does. The transformer takes lists of per-image tensors and the time ``1 - sigma``,
and predicts ``x_0 - noise``; the forward converts both ways.

Training recipe (diffusers' ``train_dreambooth_lora_z_image.py``): uniform ``u`` indexing the
folder's sigma table; LoRA on the attention projections (which includes the refiner blocks'), as
the script's default. The patch and caption embedders see the tokens of all rows flattened together,
so LoRA there is refused (``flattened_modules``).
"""

from __future__ import annotations

import torch

from cat_engine.engine.families import flow
from cat_engine.engine.families.base import DitFamily, per_row, tokenize


class ZImageFamily(DitFamily):
    name = "zimage"
    title = "Z-Image"
    transformer_class = "ZImageTransformer2DModel"
    pipeline_class = "ZImagePipeline"
    block_classes = ("ZImageTransformerBlock",)
    tokenizer_names = ("tokenizer",)
    encoder_names = ("text_encoder",)
    default_targets = ("to_k", "to_q", "to_v", "to_out.0")
    flattened_modules = ("all_x_embedder", "cap_embedder", "siglip_embedder")
    max_sequence_length = 512
    sample_guidance = 5.0

    def encode_prompts(self, model, prompts, batch_size: int = 64):
        # The chunks pad to the same length; the columns no prompt uses are then dropped.
        embeds = super().encode_prompts(model, prompts, batch_size)
        used = embeds.mask.any(dim=0)
        return embeds.map(lambda t: t[:, used])

    @torch.no_grad()
    def encode_batch(self, model, prompts: list[str]):
        from cat_engine.engine.text import PromptEmbeds

        (tokenizer,), (encoder,) = model.tokenizers, model.text_encoders
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for p in prompts
        ]
        length = min(self.max_sequence_length, tokenizer.model_max_length)
        inputs = tokenize(tokenizer, chats, length, encoder.device)
        mask = inputs["attention_mask"].bool()
        out = encoder(input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=True)
        return PromptEmbeds(out.hidden_states[-2].float(), None, mask)

    def conditioning(self, prompt) -> dict:
        return {"text_mask": prompt.mask}

    def example_prompt(self, config, rows, text_tokens, make):
        from cat_engine.engine.text import PromptEmbeds

        embeds = make((rows, text_tokens, config["cap_feat_dim"]))
        mask = torch.ones(rows, text_tokens, dtype=torch.bool, device=embeds.device)
        return PromptEmbeds(embeds, None, mask)

    def forward(self, transformer, latents, timesteps, embeds, cond, **kwargs):
        n = latents.shape[0]
        t = per_row(timesteps, n, latents)
        mask = cond["text_mask"]
        images = list(latents.unsqueeze(2).unbind(0))  # [C, 1, h, w] each: one frame
        captions = [embeds[i][mask[i]] for i in range(n)]
        out = transformer(images, (1000 - t) / 1000, captions, return_dict=False, **kwargs)[0]
        return -torch.stack(out).squeeze(2)  # the transformer predicts x_0 - noise

    def training_sigmas(self, scheduler_config, n, generator, latent_shape):
        return flow.table_sigmas(scheduler_config, flow.uniform_u(n, generator))

    def set_timesteps(self, scheduler, steps, latent_shape, transformer, device) -> None:
        sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
        mu = self.mu(scheduler.config, self.image_seq_len(transformer, latent_shape))
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def uses_cfg(self, transformer, guidance: float) -> bool:
        return guidance > 0

    def guide(self, cond, uncond, guidance):
        # ZImagePipeline's form: the guidance scale counts from 0 (no guidance), not from 1.
        return cond + guidance * (cond - uncond)


ZIMAGE = ZImageFamily()
