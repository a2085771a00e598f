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

UNets sample with DDIM (eta 0); the diffusion transformers (``engine/families/``) with their
pipeline's flow-matching Euler scheduler, timesteps, guidance (classifier-free for SD3 and Z-Image,
Flux.1-dev's embedded guidance) and negative prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from cat_engine.cat.text_encoder_lora import frozen_text, has_text_adapter
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.families import denoiser_family, dit_family
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


def _unet(unet, x, t, embeds: PromptEmbeds, resolution: int, extra: dict | None = None) -> torch.Tensor:
    family = denoiser_family(unet)
    if family is None:
        return unet_forward(unet, x, t, embeds.embeds, added_cond(embeds, resolution))
    return unet_forward(unet, x, t, embeds.embeds, {**family.conditioning(embeds), **(extra or {})})


def split_unet_call(
    unet, x, t, embeds: PromptEmbeds, n_adapter: int, resolution: int, extra: dict | None = None
) -> torch.Tensor:
    """One split-batch UNet call: the first ``n_adapter`` rows with the LoRA delta, the rest without.

    ``extra``: per-row conditioning a transformer family adds for sampling (Flux's guidance).
    """
    if split_batch_native(unet):
        with adapter_rows(unet, n_adapter):
            return _unet(unet, x, t, embeds, resolution, extra)
    return _two_call_fallback(unet, x, t, embeds, n_adapter, resolution, extra)


def _two_call_fallback(
    unet, x, t, embeds: PromptEmbeds, n_adapter: int, resolution: int, extra: dict | None = None
) -> torch.Tensor:
    # For UNets with LoRA layers that ignore adapter_rows (peft's, e.g. on convolutions): the same
    # result as the split call, at the price of two smaller UNet calls per step.
    head_rows, tail_rows = slice(0, n_adapter), slice(n_adapter, None)
    extra = extra or {}
    head = _unet(
        unet, x[head_rows], t, embeds.rows(head_rows), resolution, {k: v[head_rows] for k, v in extra.items()}
    )
    with adapters_disabled(unet):
        tail = _unet(
            unet,
            x[tail_rows],
            t,
            embeds.rows(tail_rows),
            resolution,
            {k: v[tail_rows] for k, v in extra.items()},
        )
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


def _expand(e: PromptEmbeds, n: int) -> PromptEmbeds:
    return e.map(lambda t: t.expand(n, *t.shape[1:]))


def _to(e: PromptEmbeds, device, dtype) -> PromptEmbeds:
    """Floating tensors to ``dtype``, a text mask stays boolean."""
    return e.map(lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device))


@torch.no_grad()
def decode(model, latents: torch.Tensor, batch: int) -> torch.Tensor:
    """VAE-decode latents in chunks; float32 images ``[N, 3, H, W]`` in [0, 1], on the CPU."""
    vae = model.vae
    shift = getattr(vae.config, "shift_factor", None)  # SD3/Flux/Z-Image VAEs centre their latents
    out = []
    for start in range(0, latents.shape[0], batch):
        z = latents[start : start + batch].to(vae.dtype) / vae.config.scaling_factor
        if shift:
            z = z + shift
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
    device = unet.device
    latent_size = settings.resolution // model.vae_scale_factor
    family = dit_family(model.family)
    if family is None:
        shape = (unet.config.in_channels, latent_size, latent_size)
        guided = settings.guidance > 1.0 and unet.config.time_cond_proj_dim is None
    else:
        shape = (model.vae.config.latent_channels, latent_size, latent_size)
        guided = family.uses_cfg(unet, settings.guidance)

    # Every distinct prompt is encoded once for the whole run.
    prompts = sorted({p for job in jobs for p in (job.token_prompt, job.plain_prompt)})
    encoded = encode_prompts(model, prompts)
    row_of = {p: i for i, p in enumerate(prompts)}
    uncond = uncond_embeds(model, encoded)
    base_encoded, base_uncond = encoded, uncond
    if has_text_adapter(model):  # a trained text encoder: the base rows read the frozen one
        with frozen_text(model):
            base_encoded = encode_prompts(model, prompts)
            base_uncond = uncond_embeds(model, base_encoded)

    def embeds_for(texts: list[str], source: PromptEmbeds = encoded) -> PromptEmbeds:
        return source.rows(torch.tensor([row_of[p] for p in texts]))

    batches = [jobs[i : i + settings.batch_jobs] for i in range(0, len(jobs), settings.batch_jobs)]
    bar = tqdm(total=len(batches) * settings.steps, desc="sampling", unit="step", disable=not progress)
    results = {name: [] for name in SETS}
    for batch in batches:
        k = len(batch)
        tok = embeds_for([j.token_prompt for j in batch])
        plain = embeds_for([j.plain_prompt for j in batch])
        base = embeds_for([j.plain_prompt for j in batch], base_encoded)
        if guided:
            unc, base_unc = _expand(uncond, k), _expand(base_uncond, k)
            parts, n_adapter = [tok, plain, unc, unc, base, base_unc], 4 * k
        else:
            parts, n_adapter = [tok, plain, base], 2 * k
        embeds = _to(PromptEmbeds.concat(parts), device, unet.dtype)
        denoise = _denoise if family is None else _denoise_flow
        latents = denoise(model, unet, batch, embeds, n_adapter, guided, shape, settings, bar.update)
        images = decode(model, latents, settings.decode_batch)
        for name, part in zip(SETS, images.split(k)):
            results[name].append(part)
    bar.close()
    return {name: torch.cat(parts) for name, parts in results.items()}


def _guided_rows(latents: torch.Tensor, k: int) -> torch.Tensor:
    """The denoiser's input rows: cond rows then uncond rows, per model: [tok ada] x2, then [base] x2."""
    return torch.cat([latents[: 2 * k], latents[: 2 * k], latents[2 * k :], latents[2 * k :]])


def _cond_and_uncond(pred: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cond and the uncond predictions of :func:`_guided_rows`, each ``[tok | ada | base]``."""
    ada_cond, ada_unc, base_cond, base_unc = pred.split([2 * k, 2 * k, k, k])
    return torch.cat([ada_cond, base_cond]), torch.cat([ada_unc, base_unc])


def _denoise(model, unet, batch, embeds, n_adapter, guided, shape, settings, step_done) -> torch.Tensor:
    """A UNet's DDIM loop over one batch of jobs; the final latents ``[tok | ada | base]``."""
    device, dtype, k = unet.device, unet.dtype, len(batch)
    scheduler = ddim_scheduler(model)
    scheduler.set_timesteps(settings.steps, device=device)
    noise = torch.cat([initial_latents(j.seed, shape, device, dtype) for j in batch])
    latents = noise.repeat(3, 1, 1, 1) * scheduler.init_noise_sigma  # [tok | ada | base]
    for t in scheduler.timesteps:
        x = _guided_rows(latents, k) if guided else latents
        x = scheduler.scale_model_input(x, t)
        pred = split_unet_call(unet, x, t, embeds, n_adapter, settings.resolution)
        if guided:
            cond, unc = _cond_and_uncond(pred, k)
            pred = unc + settings.guidance * (cond - unc)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        step_done()
    return latents


def _denoise_flow(model, unet, batch, embeds, n_adapter, guided, shape, settings, step_done) -> torch.Tensor:
    """A transformer family's flow-matching Euler loop over one batch of jobs, as its pipeline runs
    it (float32 latents, the family's timesteps, guidance and conditioning)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = dit_family(model.family)
    device, k = unet.device, len(batch)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.noise_scheduler.config)
    family.set_timesteps(scheduler, settings.steps, shape, unet, device)
    scheduler.set_begin_index(0)
    noise = torch.cat([initial_latents(j.seed, shape, device, torch.float32) for j in batch])
    latents = noise.repeat(3, 1, 1, 1)  # [tok | ada | base]
    rows = embeds.embeds.shape[0]
    extra = family.sample_conditioning(unet, settings.guidance, rows, device)
    for t in scheduler.timesteps:
        x = (_guided_rows(latents, k) if guided else latents).to(unet.dtype)
        pred = split_unet_call(unet, x, t, embeds, n_adapter, settings.resolution, extra).float()
        if guided:
            cond, unc = _cond_and_uncond(pred, k)
            pred = family.guide(cond, unc, settings.guidance)
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        step_done()
    return latents


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] to ``[N, H, W, 3]`` uint8, rounded as the pipeline's PIL output."""
    return (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
