"""The parts of :meth:`cat_engine.cat.train.Trainer.build` that decide what a run trains with: the
model family's targets and options, the resolution, the adapter, the memory plan (``--vram-budget``),
the learning-rate schedule, the steps of ``--epochs``, and what the LoRA file records."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch

from cat_engine.cat.buckets import BatchSampler
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.cat.data import CachedData, concept_list
from cat_engine.cat.loss_options import training_loss
from cat_engine.engine.cache import CaptionCache
from cat_engine.engine.families import dit_family
from cat_engine.engine.kohya import kohya_module_names
from cat_engine.engine.lora import add_lora, default_targets, fuse_lora, lora_parameters, writes_kohya
from cat_engine.engine.memory_plan import MemoryPlan
from cat_engine.engine.models import BaseModel
from cat_engine.engine.optimizers import make_scheduler

log = logging.getLogger("cat_engine")


def no_sync(step_fn) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` (gradients stay local: a micro-batch before the last), a no-op on one process."""
    return step_fn.no_sync() if hasattr(step_fn, "no_sync") else contextlib.nullcontext()


def release_encoders(model: BaseModel, data: CachedData, keep_text: bool = False) -> None:
    """Drop the VAE and the text encoders once the data is cached (the encoders stay when the
    captions are encoded each step, or ``keep_text``: they are trained)."""
    if isinstance(data.texts, CaptionCache) and not keep_text:
        model.release_encoders()
    else:
        model.vae = None


def with_total_steps(config: TrainConfig, sampler: BatchSampler) -> TrainConfig:
    """``config`` with ``steps`` set from ``--epochs`` when given (epochs of ``sampler``'s length)."""
    if config.epochs is None:
        return config
    return dataclasses.replace(config, steps=config.epochs * sampler.steps_per_epoch)


def training_resolution(config: TrainConfig, model: BaseModel) -> int:
    resolution = config.resolution or model.native_resolution
    # A transformer's latents are cut into 2x2 patches.
    multiple = model.vae_scale_factor * (2 if dit_family(model.family) is not None else 1)
    if resolution % multiple:
        raise ConfigError(f"--resolution {resolution} must be a multiple of {multiple} for this model")
    return resolution


def check_family_options(config: TrainConfig, model: BaseModel) -> None:
    """Refuse the DDPM-noise options on a transformer family (flow matching has no SNR table or
    epsilon to offset)."""
    family = dit_family(model.family)
    if family is None:
        return
    for flag, given in (
        ("--min-snr-gamma", config.min_snr_gamma is not None),
        ("--noise-offset", config.noise_offset > 0),
    ):
        if given:
            raise ConfigError(f"{flag}: a DDPM-noise option; {family.title} trains by flow matching")


def with_model_targets(config: TrainConfig, model: BaseModel) -> TrainConfig:
    """``config`` with ``--targets`` filled in by the model family's defaults when not given."""
    if config.targets is not None:
        return config
    return dataclasses.replace(config, targets=list(default_targets(model.unet)))


def add_adapter(unet, config: TrainConfig) -> None:
    """The LoRA layers of ``config`` on ``unet``, as the engine's layers (split-batch aware, fused kernels on CUDA)."""
    targets = config.targets if config.targets is not None else default_targets(unet)
    add_lora(unet, config.rank, config.alpha, targets, seed=config.seed)
    if not lora_parameters(unet):
        raise ConfigError(f"--targets {','.join(targets)}: matched no module of the denoiser")
    if writes_kohya(unet, config.save_format):
        kohya_module_names(unet)  # a target the kohya format cannot name fails now, not at the first save
    fuse_lora(unet)


def memory_plan_for(
    config: TrainConfig, model, resolution: int, device, batch: int | None = None
) -> MemoryPlan:
    """``config.memory``, or with ``--vram-budget`` the fastest plan predicted to fit.

    ``batch``: the rows one device runs (the global batch over the ranks); default ``--batch-size``.
    The plan is the denoiser's: with ``--train-text-encoder`` the text encoders kept on the device,
    their small LoRA, its optimizer state and the encoders' activations are not counted.
    """
    if config.vram_budget is None:
        return config.memory
    from cat_engine.cat.plan import parse_bytes
    from cat_engine.engine import vram

    try:
        budget = parse_bytes(config.vram_budget)
    except ValueError as exc:
        raise ConfigError(f"--vram-budget: {exc}") from None
    half = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    spec = vram.resolve_model(str(model.path))
    try:
        plan, estimate = vram.best_plan(
            spec,
            resolution,
            batch or config.batch_size,
            budget,
            config.rank,
            loss_fn=training_loss(config.cat_weight, config.min_snr_gamma, model.noise_scheduler),
            half=half,
            attention=config.memory.attention,
            optimizer=config.optimizer,
        )
    except vram.NoPlanFits as exc:
        raise ConfigError(f"--vram-budget {config.vram_budget}: {exc}") from None
    log.info("--vram-budget %s: predicted peak %s", config.vram_budget, vram.format_bytes(estimate.total))
    return dataclasses.replace(plan, compile=config.memory.compile, channels_last=config.memory.channels_last)


def lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """``--lr-scheduler`` after ``--lr-warmup-steps`` of linear warm-up, over the run's steps."""
    return make_scheduler(
        optimizer,
        config.lr_scheduler,
        config.lr_warmup_steps,
        config.steps,
        config.lr_scheduler_num_cycles,
        config.lr_scheduler_power,
    )


def adapter_metadata(config: TrainConfig, model: BaseModel, resolution: int) -> dict:
    """What the LoRA file records about its training."""
    concepts = concept_list(config)
    return {
        # the first concept's token and class word stay the adapter's default for cat-engine eval
        "token": concepts[0]["token"],
        "class_word": concepts[0]["class_word"],
        "concepts": [{"token": c["token"], "class_word": c["class_word"]} for c in concepts],
        "cat_weight": config.cat_weight,
        "cat_every": config.cat_every,
        "plain_mode": config.plain_mode,
        "base": str(model.path),
        "family": model.family,
        "resolution": resolution,
        "prediction_type": model.prediction_type,
        "lr": config.lr,
        "seed": config.seed,
        "train_text_encoder": config.train_text_encoder,
    }
