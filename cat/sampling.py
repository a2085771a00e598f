"""Batched split-batch sampling of the three KPS image sets (docs/design.md §2, §4).

One job is a (prompt template, seed) pair and yields three images: ``G_tok`` (adapter, token
prompt), ``G_ada`` (adapter, plain prompt) and ``G_base`` (base model, plain prompt). Many jobs
run together in one denoising loop, one UNet call per step, with rows ordered as the split batch
wants them (adapter rows first, base rows last)::

    [tok cond | ada cond | tok uncond | ada uncond]   [base cond | base uncond]
     <------------- adapter rows: 4K ------------->   <---- base rows: 2K ---->

(``K`` jobs; without classifier-free guidance the uncond rows are absent.) Each image equals what
the diffusers pipeline gives alone for the same prompt, seed, LoRA and scheduler: its initial
latents are drawn from its own ``torch.Generator`` exactly as ``randn_tensor`` does for a batch of
one, the uncond embedding is the pipeline's, and the guidance and scheduler step are per-row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import adapters_disabled, fuse_lora
from cat_engine.engine.split_batch import adapter_rows
from cat_engine.engine.text import PromptEmbeds, added_cond, encode_prompts

SETS = ("tok", "ada", "base")


@dataclass(frozen=True)
class Job:
    """One (prompt, seed): ``token_prompt`` feeds G_tok, ``plain_prompt`` feeds G_ada and G_base."""

    token_prompt: str
    plain_prompt: str
    seed: int


@dataclass(frozen=True)
class SampleSettings:
    resolution: int
    steps: int = 25
    guidance: float = 7.5
    batch_jobs: int = 8  # jobs per denoising batch: 6 UNet rows each with guidance, 3 without
    decode_batch: int = 8  # images per VAE decode call


def ddim_scheduler(model):
    """A DDIM scheduler (eta 0: deterministic) from the model's own scheduler config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(model.noise_scheduler.config)


def initial_latents(seed: int, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """``[1, C, h, w]`` noise for one image, as diffusers' ``randn_tensor`` draws it for a CPU generator.

    The generator lives on the CPU whatever the device, so a seed gives the same image everywhere.
    """
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, *shape), generator=generator, dtype=dtype).to(device)


def split_batch_native(unet) -> bool:
    """True when the UNet's LoRA layers honour ``adapter_rows`` (the engine's fused layers are in).

    A peft-only UNet ignores ``adapter_rows``; then :func:`split_unet_call` falls back to two calls.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    # Every LoRA layer must be a fused one: fuse_lora leaves LoRA on convolutions to peft.
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    return bool(layers) and all(type(m).__module__ == "cat_engine.engine.fused_lora" for m in layers)


def _unet(unet, x, t, embeds: PromptEmbeds, resolution: int) -> torch.Tensor:
    return unet_forward(unet, x, t, embeds.embeds, added_cond(embeds, resolution))


def split_unet_call(unet, x, t, embeds: PromptEmbeds, n_adapter: int, resolution: int) -> torch.Tensor:
    """One split-batch UNet call: the first ``n_adapter`` rows with the LoRA delta, the rest without."""
    if split_batch_native(unet):
        with adapter_rows(unet, n_adapter):
            return _unet(unet, x, t, embeds, resolution)
    return _two_call_fallback(unet, x, t, embeds, n_adapter, resolution)


def _two_call_fallback(unet, x, t, embeds: PromptEmbeds, n_adapter: int, resolution: int) -> torch.Tensor:
    # For UNets with LoRA layers that ignore adapter_rows (peft's, e.g. on convolutions): the same
    # result as the split call, at the price of two smaller UNet calls per step.
    head = _unet(unet, x[:n_adapter], t, embeds.rows(slice(0, n_adapter)), resolution)
    with adapters_disabled(unet):
        tail = _unet(unet, x[n_adapter:], t, embeds.rows(slice(n_adapter, None)), resolution)
    return torch.cat([head, tail])


def uncond_embeds(model, like: PromptEmbeds) -> PromptEmbeds:
    """The pipeline's negative embedding for no negative prompt: ``""`` encoded (SD), zeros (SDXL).

    SDXL pipelines zero it when their ``force_zeros_for_empty_prompt`` config is on (the default).
    """
    if model.family == "sdxl":
        force_zeros = True
        index = model.path / "model_index.json" if model.path is not None else None
        if index is not None and index.exists():
            force_zeros = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
        if force_zeros:
            return PromptEmbeds(torch.zeros_like(like.embeds[:1]), torch.zeros_like(like.pooled[:1]))
    return encode_prompts(model, [""])


def _cat_embeds(parts: list[PromptEmbeds]) -> PromptEmbeds:
    pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
    return PromptEmbeds(torch.cat([p.embeds for p in parts]), pooled)


def _expand(e: PromptEmbeds, n: int) -> PromptEmbeds:
    return PromptEmbeds(e.embeds.expand(n, -1, -1), None if e.pooled is None else e.pooled.expand(n, -1))


@torch.no_grad()
def decode(model, latents: torch.Tensor, batch: int) -> torch.Tensor:
    """VAE-decode latents in chunks; float32 images ``[N, 3, H, W]`` in [0, 1], on the CPU."""
    vae = model.vae
    out = []
    for start in range(0, latents.shape[0], batch):
        z = latents[start : start + batch].to(vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
        out.append((image.float() * 0.5 + 0.5).clamp(0, 1).cpu())  # the pipeline's denormalize
    return torch.cat(out)


@torch.no_grad()
def sample_jobs(
    model, jobs: list[Job], settings: SampleSettings, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Generate G_tok, G_ada and G_base for every job; ``{"tok"|"ada"|"base": [N, 3, H, W]}`` in [0, 1].

    ``model`` is a :class:`cat_engine.engine.models.BaseModel` whose UNet carries the LoRA adapter;
    its UNet, VAE and text encoders are used on their own device and dtype. Row ``i`` of each set
    belongs to ``jobs[i]``.
    """
    from tqdm.auto import tqdm

    unet = fuse_lora(model.unet)
    device, dtype = unet.device, unet.dtype
    latent_size = settings.resolution // model.vae_scale_factor
    shape = (unet.config.in_channels, latent_size, latent_size)
    guided = settings.guidance > 1.0 and unet.config.time_cond_proj_dim is None

    # Every distinct prompt is encoded once for the whole run.
    prompts = sorted({p for job in jobs for p in (job.token_prompt, job.plain_prompt)})
    encoded = encode_prompts(model, prompts)
    row_of = {p: i for i, p in enumerate(prompts)}
    uncond = uncond_embeds(model, encoded)

    def embeds_for(texts: list[str]) -> PromptEmbeds:
        return encoded.rows(torch.tensor([row_of[p] for p in texts]))

    batches = [jobs[i : i + settings.batch_jobs] for i in range(0, len(jobs), settings.batch_jobs)]
    bar = tqdm(total=len(batches) * settings.steps, desc="sampling", unit="step", disable=not progress)
    results = {name: [] for name in SETS}
    for batch in batches:
        k = len(batch)
        tok = embeds_for([j.token_prompt for j in batch])
        plain = embeds_for([j.plain_prompt for j in batch])
        if guided:
            unc = _expand(uncond, k)
            parts, n_adapter = [tok, plain, unc, unc, plain, unc], 4 * k
        else:
            parts, n_adapter = [tok, plain, plain], 2 * k
        embeds = _cat_embeds(parts)
        embeds = PromptEmbeds(
            embeds.embeds.to(device, dtype),
            None if embeds.pooled is None else embeds.pooled.to(device, dtype),
        )

        scheduler = ddim_scheduler(model)
        scheduler.set_timesteps(settings.steps, device=device)
        noise = torch.cat([initial_latents(j.seed, shape, device, dtype) for j in batch])
        latents = noise.repeat(3, 1, 1, 1) * scheduler.init_noise_sigma  # [tok | ada | base]
        for t in scheduler.timesteps:
            x = latents
            if guided:  # cond rows then uncond rows, per model: [tok ada] x2, then [base] x2
                x = torch.cat([latents[: 2 * k], latents[: 2 * k], latents[2 * k :], latents[2 * k :]])
            x = scheduler.scale_model_input(x, t)
            pred = split_unet_call(unet, x, t, embeds, n_adapter, settings.resolution)
            if guided:
                ada_cond, ada_unc, base_cond, base_unc = pred.split([2 * k, 2 * k, k, k])
                cond, unc = torch.cat([ada_cond, base_cond]), torch.cat([ada_unc, base_unc])
                pred = unc + settings.guidance * (cond - unc)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            bar.update()
        images = decode(model, latents, settings.decode_batch)
        for name, part in zip(SETS, images.split(k)):
            results[name].append(part)
    bar.close()
    return {name: torch.cat(parts) for name, parts in results.items()}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] to ``[N, H, W, 3]`` uint8, rounded as the pipeline's PIL output."""
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
