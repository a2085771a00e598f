"""The training data: every concept's images in one pool, encoded once, and each step's samples.

    concept folders --(cat/dataset.py)--> pixels and captions --(once)--> VAE latents, text embeddings

After :func:`prepare_data` the VAE and text encoders are no longer needed: each step takes the
samples :func:`sample_indices` names from the cached latent distributions and caption embeddings,
and :func:`draw_batch` turns them into the step's :class:`~cat_engine.engine.batch.CatBatch`:
DDPM noise for the UNet families, flow matching for the transformer families
(:func:`draw_flow_batch`, docs/design.md §7b).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from cat_engine.cat.config import TrainConfig
from cat_engine.cat.dataset import builtin_concept_dir, load_concept_images
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.cache import CaptionCache, LatentCache, encode_captions, encode_latents
from cat_engine.engine.families import DitFamily, dit_family
from cat_engine.engine.families.flow import TRAIN_TIMESTEPS, flow_noisy, flow_target
from cat_engine.engine.text import sdxl_time_ids

log = logging.getLogger("cat_engine")


def concept_list(config: TrainConfig) -> list[dict]:
    """The concepts of the adapter: ``config.concepts``, or the one of ``--data/--token/--class-word``."""
    if config.concepts:
        return config.concepts
    return [
        {
            "data": config.data or str(builtin_concept_dir()),
            "token": config.token,
            "class_word": config.class_word,
            "caption_template": config.caption_template,
        }
    ]


@dataclass
class TrainingImages:
    """Every concept's images in one set: row ``i`` shows concept ``concept_index[i]``."""

    pixels: torch.Tensor  # [N, 3, R, R] in [-1, 1]
    captions: list[str]  # with the row's own trigger token
    plain_captions: list[str]  # the same without it: the CAT term's caption for that row
    concept_index: list[int]


def load_training_images(config: TrainConfig, resolution: int) -> TrainingImages:
    """Load each concept's folder; its captions use its own token and class word.

    A multi-concept batch then mixes concepts naturally: the rows are one pool and the sampler
    shuffles over all of them (a concept weighs by its number of images).
    """
    pixels, captions, plain, index = [], [], [], []
    for i, concept in enumerate(concept_list(config)):
        data = load_concept_images(
            concept["data"],
            token=concept["token"],
            class_word=concept["class_word"],
            caption_template=concept["caption_template"],
            resolution=resolution,
            flip=config.flip,
        )
        name = f"{concept['token']} {concept['class_word']}: " if config.concepts else ""
        log.info("data: %s%s", name, data.summary.line())
        pixels.append(data.pixels)
        captions += data.captions
        plain += data.plain_captions(config.plain_mode)
        index += [i] * len(data)
    return TrainingImages(torch.cat(pixels), captions, plain, index)


@dataclass
class CachedData:
    """Everything the loop needs per sample, already encoded: no VAE or text encoder needed."""

    latents: LatentCache  # scaled latent distributions, [N, 4, h, w]
    texts: CaptionCache  # embeddings of the distinct token and plain captions
    captions: list[str]
    concept_index: list[int] = field(default_factory=list)  # which concept each row shows
    family: str = "sd"  # the base model's family (engine/families/): how batches are drawn

    def __len__(self) -> int:
        return len(self.latents)


def prepare_data(config: TrainConfig, model, resolution: int, device) -> CachedData:
    """Load and check the images, then encode latents and captions once."""
    images = load_training_images(config, resolution)
    model.vae.to(device)
    for encoder in model.text_encoders:
        encoder.to(device)
    latents = encode_latents(model.vae, images.pixels)
    texts = encode_captions(model, images.captions, images.plain_captions)
    return CachedData(
        latents.to(device), texts.to(device), images.captions, images.concept_index, model.family
    )


def sample_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Samples of ``step``: an epoch-wise shuffled stream, a pure function of the step.

    Sample ``k`` of the stream is ``perm(epoch)[k % n]`` with ``epoch = k // n``, so the data
    position is just the step number and a resumed run reads exactly what a straight run reads.
    """
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


def draw_batch(
    data: CachedData,
    indices: list[int],
    generator,
    noise_scheduler,
    resolution: int,
    rows: slice = slice(None),
) -> CatBatch:
    """The :class:`CatBatch` of samples ``indices``: z_t, t and the target drawn for each, ``rows`` of them.

    All randomness comes from ``generator``, a CPU one: identical draws on any device, and
    resumable. The draws cover the whole global batch on every rank, so the generator advances
    alike everywhere (and a checkpoint from any rank count resumes on any other); ``rows`` is this
    rank's slice of it. A transformer family's batch is drawn by :func:`draw_flow_batch`.
    """
    family = dit_family(data.family)
    if family is not None:
        return draw_flow_batch(data, indices, generator, noise_scheduler, family, rows)
    idx = torch.tensor(indices)
    mean, std = data.latents.mean[idx], data.latents.std[idx]
    device = mean.device
    latents = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    noise = torch.randn(mean.shape, generator=generator).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
    t = t.to(device)
    idx, latents, noise, t = idx[rows], latents[rows], noise[rows], t[rows]
    noisy = noise_scheduler.add_noise(latents, noise, t)
    prediction = noise_scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = latents
    token, plain = data.texts.token(idx), data.texts.plain(idx)
    added = plain_added = None
    if token.pooled is not None:  # SDXL: pooled text and size micro-conditioning
        time_ids = sdxl_time_ids(resolution, len(idx), device)
        added = {"text_embeds": token.pooled, "time_ids": time_ids}
        plain_added = {"text_embeds": plain.pooled, "time_ids": time_ids}
    return CatBatch(noisy, t, token.embeds, plain.embeds, target, added, plain_added)


def draw_flow_batch(
    data: CachedData,
    indices: list[int],
    generator,
    noise_scheduler,
    family: DitFamily,
    rows: slice = slice(None),
) -> CatBatch:
    """The flow-matching :class:`CatBatch` of samples ``indices`` (docs/design.md §7b).

    ``x_t = (1 - sigma) x_0 + sigma noise``, target ``noise - x_0``, sigma drawn by the family's own
    recipe from ``noise_scheduler``'s config; ``timesteps`` are ``1000 * sigma``. The three row groups
    of the CAT step share ``x_t``, ``t`` and the noise, as for the UNets. Randomness as in
    :func:`draw_batch`: all from ``generator``, for the whole global batch.
    """
    idx = torch.tensor(indices)
    mean, std = data.latents.mean[idx], data.latents.std[idx]
    device = mean.device
    latents = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    noise = torch.randn(mean.shape, generator=generator).to(device)
    sigma = family.training_sigmas(noise_scheduler.config, len(idx), generator, mean.shape).to(device)
    idx, latents, noise, sigma = idx[rows], latents[rows], noise[rows], sigma[rows]
    token, plain = data.texts.token(idx), data.texts.plain(idx)
    return CatBatch(
        flow_noisy(latents, noise, sigma),
        sigma * TRAIN_TIMESTEPS,
        token.embeds,
        plain.embeds,
        flow_target(latents, noise),
        family.conditioning(token),
        family.conditioning(plain),
    )


def compile_check_inputs(data: CachedData, resolution: int):
    """One real sample, for the compiled-vs-eager gradient check of ``--compile``."""
    family = dit_family(data.family)
    if family is not None:
        token, plain = data.texts.token([0]), data.texts.plain([0])
        z = data.latents.mean[:1]
        t = torch.full((1,), TRAIN_TIMESTEPS / 2, device=z.device)
        return CatBatch(
            z,
            t,
            token.embeds,
            plain.embeds,
            torch.zeros_like(z),
            family.conditioning(token),
            family.conditioning(plain),
        )
    token = data.texts.token([0])
    added = None
    if token.pooled is not None:
        added = {"text_embeds": token.pooled, "time_ids": sdxl_time_ids(resolution, 1, token.pooled.device)}
    t = torch.tensor([500], device=data.latents.mean.device)
    z = data.latents.mean[:1]
    return CatBatch(z, t, token.embeds, data.texts.plain([0]).embeds, torch.zeros_like(z), added)
