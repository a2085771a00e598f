"""The training data: every concept's images in one pool, encoded once, and each step's samples.

    concept folders --(cat/dataset.py)--> pixels and captions --(once)--> VAE latents, text embeddings

Images keep their aspect ratio in buckets (``cat/buckets.py``; ``--no-buckets``: the centre
square), and their latents are cached per bucket. After :func:`prepare_data` the VAE is no longer
needed, nor the text encoders unless captions change per step (``--shuffle-caption``): each step
takes the samples :class:`~cat_engine.cat.buckets.BatchSampler` names from the cached latent
distributions and caption embeddings, and :func:`draw_batch` turns them into the step's
:class:`~cat_engine.engine.batch.CatBatch`: DDPM noise for the UNet families, flow matching for the
transformer families (docs/design.md §9).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

from cat_engine.cat.buckets import (
    BatchSampler,
    bucket_sizes,
    bucket_step,
    sample_indices,  # noqa: F401 - the one-bucket stream, still named here
)
from cat_engine.cat.caption_ops import CaptionOptions, Concept, step_captions
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.cat.dataset import builtin_concept_dir, load_concept_images
from cat_engine.cat.text_encoder_lora import frozen_text
from cat_engine.cat.token_limit import warn_tokens_past_limit
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.cache import (
    BucketedLatents,
    CaptionCache,
    LatentCache,
    encode_captions,
    encode_latents_by_size,
)
from cat_engine.engine.families import DitFamily, dit_family
from cat_engine.engine.families.flow import TRAIN_TIMESTEPS, flow_noisy, flow_target
from cat_engine.engine.text import PromptEmbeds, encode_prompts

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

    images: list[torch.Tensor]  # [3, H, W] in [-1, 1], H x W the row's bucket
    captions: list[str]  # with the row's own trigger token
    plain_captions: list[str]  # the same without it: the CAT term's caption for that row
    concept_index: list[int]
    time_ids: torch.Tensor  # [N, 6]: SDXL's original size, crop top-left and target size per row
    repeats: list[int]  # how often each row counts per epoch

    @property
    def pixels(self) -> torch.Tensor:
        """The rows stacked, ``[N, 3, H, W]``, when they share one size."""
        return torch.stack(self.images)


def buckets_for(config: TrainConfig, resolution: int) -> list[tuple[int, int]] | None:
    """The aspect-ratio buckets of this run, or ``None`` for the centre square (``--no-buckets``)."""
    if not config.buckets:
        return None
    step = bucket_step(resolution, config.bucket_step)
    if resolution % step:
        raise ConfigError(
            f"--resolution {resolution} must be a multiple of --bucket-step {step} "
            "(or give another --bucket-step, or --no-buckets)"
        )
    return bucket_sizes(resolution, config.bucket_step)


def load_training_images(config: TrainConfig, resolution: int, tokenizers=()) -> TrainingImages:
    """Load each concept's folder; its captions use its own token and class word. With the model's
    ``tokenizers``, an image whose trigger token its text encoder would cut off gets a warning.

    A multi-concept batch then mixes concepts naturally: the rows are one pool and the sampler
    shuffles over all of them (a concept weighs by its number of images and their repeats).
    """
    images, captions, plain, index, crops, repeats = [], [], [], [], [], []
    buckets = buckets_for(config, resolution)
    for i, concept in enumerate(concept_list(config)):
        data = load_concept_images(
            concept["data"],
            token=concept["token"],
            class_word=concept["class_word"],
            caption_template=concept["caption_template"],
            resolution=resolution,
            flip=config.flip,
            buckets=buckets,
        )
        name = f"{concept['token']} {concept['class_word']}: " if config.concepts else ""
        log.info("data: %s%s", name, data.summary.line())
        warn_tokens_past_limit(tokenizers, data.captions, data.files, concept["token"])
        images += data.images
        captions += data.captions
        plain += data.plain_captions(config.plain_mode)
        index += [i] * len(data)
        crops += data.crops
        repeats += data.repeats
    if buckets:
        counts = Counter(c.target for c in crops)
        log.info("buckets: %s", ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(counts.items())))
    time_ids = torch.tensor([c.time_ids() for c in crops], dtype=torch.float32)
    return TrainingImages(images, captions, plain, index, time_ids, repeats)


class LiveText:
    """The frozen encoders' embeddings computed each step (captions that change per step): the
    model's text encoders, with their LoRA adapters disabled when they carry one."""

    def __init__(self, model):
        self.model = model

    def lookup(self, captions: list[str]) -> PromptEmbeds:
        with frozen_text(self.model):
            return encode_prompts(self.model, captions)


@dataclass
class CachedData:
    """Everything the loop needs per sample, already encoded.

    ``texts`` embeds a step's captions: the cache of every caption the data can use, or, when
    captions change per step, the text encoders themselves (:class:`LiveText`).
    """

    latents: BucketedLatents | LatentCache  # scaled latent distributions, one cache per bucket
    texts: CaptionCache | LiveText
    captions: list[str]
    concept_index: list[int] = field(default_factory=list)  # which concept each row shows
    family: str = "sd"  # the base model's family (engine/families/): how batches are drawn
    plain_captions: list[str] = field(default_factory=list)
    time_ids: torch.Tensor | None = None  # [N, 6] SDXL micro-conditioning of each row, CPU
    repeats: list[int] = field(default_factory=list)
    concepts: list[Concept] = field(default_factory=list)  # plain-caption rule of each concept
    caption_options: CaptionOptions = field(default_factory=CaptionOptions)

    def __len__(self) -> int:
        return len(self.latents)

    def groups(self) -> list[list[int]]:
        """The rows of each bucket, each listed once per repeat: the sampler's pool."""
        repeats = self.repeats or [1] * len(self)
        return [[i for i in rows for _ in range(repeats[i])] for rows in self.latents.groups()]

    def text_rows(self, index: torch.Tensor) -> tuple[PromptEmbeds, PromptEmbeds]:
        """The token and plain embeddings of image rows ``index``, as cached (or encoded now)."""
        if isinstance(self.texts, CaptionCache):
            return self.texts.token(index), self.texts.plain(index)
        token, plain = self.caption_rows(index)
        return self.texts.lookup(token), self.texts.lookup(plain)

    def caption_rows(self, index: torch.Tensor) -> tuple[list[str], list[str]]:
        """The token and plain captions of image rows ``index``."""
        rows = index.tolist()
        return [self.captions[i] for i in rows], [self.plain_captions[i] for i in rows]

    def sampler(self, batch_size: int, seed: int) -> BatchSampler:
        return BatchSampler(self.groups(), batch_size, seed)


def caption_options(config: TrainConfig) -> CaptionOptions:
    return CaptionOptions(config.caption_dropout, config.shuffle_caption, config.keep_tokens)


def prepare_data(config: TrainConfig, model, resolution: int, device) -> CachedData:
    """Load and check the images, then encode latents (per bucket) and captions once."""
    images = load_training_images(config, resolution, model.tokenizers)
    model.vae.to(device)
    for encoder in model.text_encoders:
        encoder.to(device)
    latents = encode_latents_by_size(model.vae, images.images)
    options = caption_options(config)
    if options.shuffle:
        texts = LiveText(model)
    else:
        extra = [""] if options.dropout > 0 else []
        texts = encode_captions(model, images.captions, images.plain_captions, extra=extra).to(device)
    concepts = [Concept(c["token"], c["class_word"], config.plain_mode) for c in concept_list(config)]
    return CachedData(
        latents.to(device),
        texts,
        images.captions,
        images.concept_index,
        model.family,
        images.plain_captions,
        images.time_ids,
        images.repeats,
        concepts,
        options,
    )


@dataclass(frozen=True)
class NoiseOptions:
    offset: float = 0.0  # --noise-offset: a per-channel constant added to the noise


@dataclass
class DrawnBatch:
    """A step's batch and the captions of its rows (a trained text encoder encodes them itself,
    ``cat/text_encoder_lora.py``); the batch holds the frozen encoders' embeddings."""

    batch: CatBatch
    token_captions: list[str]
    plain_captions: list[str]

    def split(self, k: int) -> list[DrawnBatch]:
        """``k`` equal micro-batches, rows in order."""
        m = self.batch.rows // k
        return [
            DrawnBatch(
                part, self.token_captions[i * m : (i + 1) * m], self.plain_captions[i * m : (i + 1) * m]
            )
            for i, part in enumerate(micro_batches(self.batch, k))
        ]


def micro_batches(batch: CatBatch, k: int) -> list[CatBatch]:
    """``batch`` cut into ``k`` equal micro-batches, rows in order."""
    if k == 1:
        return [batch]
    m = batch.rows // k
    return [batch.map(lambda t, i=i: t[i * m : (i + 1) * m] if t.dim() else t) for i in range(k)]


def draw_batch(*args, **kwargs) -> CatBatch:
    """:func:`draw_rows`' batch (same arguments), without the captions."""
    return draw_rows(*args, **kwargs).batch


def draw_rows(
    data: CachedData,
    indices: list[int],
    generator,
    noise_scheduler,
    rows=slice(None),
    noise: NoiseOptions = NoiseOptions(),
) -> DrawnBatch:
    """The :class:`CatBatch` of samples ``indices``: z_t, t and the target drawn for each, ``rows`` of
    them, with those rows' captions.

    All randomness comes from ``generator``, a CPU one: identical draws on any device, and
    resumable. The draws cover the whole global batch on every rank, so the generator advances
    alike everywhere (and a checkpoint from any rank count resumes on any other); ``rows`` (a
    slice or an index tensor) is this rank's part of it. Draws, in order: latent samples, noise,
    timesteps (a transformer family's sigmas, by its own recipe), then only for the options that
    are on: the noise offset, caption dropout and shuffles (``cat/caption_ops.py``).
    """
    family = dit_family(data.family)
    idx = torch.tensor(indices)
    cached = data.latents.rows(idx)
    mean, std = cached.mean, cached.std
    device = mean.device
    latents = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    eps = torch.randn(mean.shape, generator=generator).to(device)
    if family is not None:
        t = family.training_sigmas(noise_scheduler.config, len(idx), generator, mean.shape).to(device)
    else:
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        t = t.to(device)
    if noise.offset:
        eps = eps + noise.offset * torch.randn((*mean.shape[:2], 1, 1), generator=generator).to(device)
    captions = (
        step_captions(
            [data.captions[i] for i in indices],
            [data.concepts[data.concept_index[i]] for i in indices],
            data.caption_options,
            generator,
        )
        if data.caption_options.active
        else None
    )
    idx, latents, eps, t = idx[rows], latents[rows], eps[rows], t[rows]
    if captions is None:
        token, plain = data.text_rows(idx)
        texts = data.caption_rows(idx)
    else:
        picked = range(len(indices))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).tolist()
        texts = [captions[0][i] for i in picked], [captions[1][i] for i in picked]
        token, plain = data.texts.lookup(texts[0]), data.texts.lookup(texts[1])
    if family is not None:
        return DrawnBatch(_flow_batch(family, latents, eps, t, token, plain), *texts)
    noisy = noise_scheduler.add_noise(latents, eps, t)
    prediction = noise_scheduler.config.prediction_type
    if prediction == "epsilon":
        target = eps
    elif prediction == "v_prediction":
        target = noise_scheduler.get_velocity(latents, eps, t)
    else:
        target = latents
    added = plain_added = None
    if token.pooled is not None:  # SDXL: pooled text and size micro-conditioning
        time_ids = data.time_ids[idx].to(device)
        added = {"text_embeds": token.pooled, "time_ids": time_ids}
        plain_added = {"text_embeds": plain.pooled, "time_ids": time_ids}
    return DrawnBatch(CatBatch(noisy, t, token.embeds, plain.embeds, target, added, plain_added), *texts)


def _flow_batch(family: DitFamily, latents, eps, sigma, token, plain) -> CatBatch:
    """The flow-matching batch (docs/design.md §9): ``x_t = (1 - sigma) x_0 + sigma noise``, target
    ``noise - x_0``, ``timesteps`` ``1000 * sigma``; the three row groups share them, as for the UNets."""
    return CatBatch(
        flow_noisy(latents, eps, sigma),
        sigma * TRAIN_TIMESTEPS,
        token.embeds,
        plain.embeds,
        flow_target(latents, eps),
        family.conditioning(token),
        family.conditioning(plain),
    )


def compile_check_inputs(data: CachedData) -> CatBatch:
    """One real sample, for the compiled-vs-eager gradient check of ``--compile``."""
    token, plain = data.text_rows(torch.tensor([0]))
    z = data.latents.rows([0]).mean
    family = dit_family(data.family)
    if family is not None:
        t = torch.full((1,), TRAIN_TIMESTEPS / 2, device=z.device)
        zero = torch.zeros_like(z)
        return CatBatch(
            z, t, token.embeds, plain.embeds, zero, family.conditioning(token), family.conditioning(plain)
        )
    added = None
    if token.pooled is not None:
        added = {"text_embeds": token.pooled, "time_ids": data.time_ids[:1].to(token.pooled.device)}
    t = torch.tensor([500], device=z.device)
    return CatBatch(z, t, token.embeds, plain.embeds, torch.zeros_like(z), added)
