"""``cat-engine train``: the CAT training recipe, top to bottom: setup, train, save.

    images --(once)--> VAE --> cached latent distributions
    captions --(once)--> text encoder(s) --> cached embeddings of y_T (token) and y (plain)
    each step: noise, t --> z_t --> cat_loss (one split-batch UNet call) --> backward --> AdamW

Also runnable as ``python -m cat_engine train``, and data-parallel under torchrun
(``torchrun --nproc_per_node N -m cat_engine train ...``, or ``cat-engine train --nproc N``):
``--batch-size`` is the global batch; every rank draws the whole batch's randomness from the same
seeded generator and keeps its own equal slice of rows, DDP averages the LoRA gradients, so N ranks
train the adapter a single process would (up to float rounding). Rank 0 writes every output.
Several concepts can share one adapter (``concepts`` in the config); ``--manifest`` trains one
adapter per concept instead (cat/manifest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cat_engine.cat.config import (
    FIELDS,
    ConfigError,
    TrainConfig,
    build_config,
    config_differences,
    load_yaml,
)
from cat_engine.cat.loss import CatLossOutput, step_loss
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine import distributed as dist
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.cache import CaptionCache, LatentCache, encode_captions, encode_latents
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.lora import (
    LORA_WEIGHT_NAME,
    add_lora,
    fuse_lora,
    lora_named_parameters,
    lora_parameters,
    save_lora,
)
from cat_engine.engine.memory_plan import MemoryPlan, apply_memory_plan, make_optimizer
from cat_engine.engine.models import load_base

log = logging.getLogger("cat_engine")
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


class TrainingError(CatEngineError):
    """Training stopped for a reason the user must see (non-finite loss...)."""


# ----------------------------------------------------------------------------------------- data
@dataclass
class CachedData:
    """Everything the loop needs per sample, already encoded: no VAE or text encoder needed."""

    latents: LatentCache  # scaled latent distributions, [N, 4, h, w]
    texts: CaptionCache  # embeddings of the distinct token and plain captions
    captions: list[str]
    concept_index: list[int] = field(default_factory=list)  # which concept each row shows

    def __len__(self) -> int:
        return len(self.latents)


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


def concept_list(config: TrainConfig) -> list[dict]:
    """The concepts of the adapter: ``config.concepts``, or the one of ``--data/--token/--class-word``."""
    if config.concepts:
        return config.concepts
    from cat_engine.cat.dataset import builtin_concept_dir

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
    from cat_engine.cat.dataset import load_concept_images

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


def prepare_data(config: TrainConfig, model, resolution: int, device) -> CachedData:
    """Load and check the images, then encode latents and captions once."""
    images = load_training_images(config, resolution)
    model.vae.to(device)
    for encoder in model.text_encoders:
        encoder.to(device)
    latents = encode_latents(model.vae, images.pixels)
    texts = encode_captions(model, images.captions, images.plain_captions)
    return CachedData(latents.to(device), texts.to(device), images.captions, images.concept_index)


# ------------------------------------------------------------------------------------ one step
def training_step(
    step_fn,
    noise_scheduler,
    data: CachedData,
    step: int,
    config: TrainConfig,
    generator,
    resolution,
    rows: slice = slice(None),
):
    """Draw z_t for the step's samples and return the :class:`CatLossOutput` of ``rows`` of them.

    ``step_fn`` is a :class:`~cat_engine.engine.distributed.TrainStep` (DDP-wrapped on several ranks).
    The draws cover the whole global batch on every rank, so the generator advances alike
    everywhere (and a checkpoint from any rank count resumes on any other); ``rows`` is this
    rank's slice of it.
    """
    from cat_engine.engine.text import sdxl_time_ids

    idx = torch.tensor(sample_indices(step, config.batch_size, len(data), config.seed))
    mean, std = data.latents.mean[idx], data.latents.std[idx]
    device = mean.device
    # All randomness from one CPU generator: identical draws on any device, and resumable.
    latents = mean + std * torch.randn(mean.shape, generator=generator).to(device)
    noise = torch.randn(mean.shape, generator=generator).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator).to(
        device
    )
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
    loss, ldm, cat = step_fn(CatBatch(noisy, t, token.embeds, plain.embeds, target, added, plain_added))
    return CatLossOutput(loss, ldm, cat)


# ---------------------------------------------------------------------------------- memory plan
def memory_plan_for(
    config: TrainConfig, model, resolution: int, device, batch: int | None = None
) -> MemoryPlan:
    """The plan the flags ask for, or with ``--vram-budget`` the fastest one predicted to fit.

    ``batch``: the rows one device runs (the global batch over the ranks); default ``--batch-size``.
    """
    if config.vram_budget is None:
        return MemoryPlan(
            attention=config.attention,
            gradient_checkpointing=config.gradient_checkpointing,
            precision=config.precision,
            compile=config.compile,
            channels_last=config.channels_last,
        )
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
            loss_fn=step_loss(config.cat_weight),
            half=half,
            attention=config.attention,
        )
    except vram.NoPlanFits as exc:
        raise ConfigError(f"--vram-budget {config.vram_budget}: {exc}") from None
    log.info("--vram-budget %s: predicted peak %s", config.vram_budget, vram.format_bytes(estimate.total))
    return dataclasses.replace(plan, compile=config.compile, channels_last=config.channels_last)


def _check_inputs(data: CachedData, resolution: int):
    """One real sample, for the compiled-vs-eager gradient check of ``--compile``."""
    from cat_engine.engine.text import sdxl_time_ids

    token = data.texts.token([0])
    added = None
    if token.pooled is not None:
        added = {"text_embeds": token.pooled, "time_ids": sdxl_time_ids(resolution, 1, token.pooled.device)}
    t = torch.tensor([500], device=data.latents.mean.device)
    z = data.latents.mean[:1]
    return CatBatch(z, t, token.embeds, data.texts.plain([0]).embeds, torch.zeros_like(z), added)


# ---------------------------------------------------------------------------------------- train
def _lr_lambda(warmup: int):
    return lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0


def train(config: TrainConfig, progress: bool = True, ranks: dist.DistContext = dist.SINGLE) -> Path:
    """Run the recipe; return the path of the saved LoRA. Raises the engine's user errors.

    ``ranks``: the torchrun group this process belongs to (:func:`dist.init_distributed`); every
    rank calls ``train`` with the same config.
    """
    from tqdm.auto import tqdm

    output = Path(config.output)
    device = dist.device_for(config.device, ranks)
    try:
        rows = dist.local_rows(config.batch_size, ranks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    torch.manual_seed(config.seed)

    # -- setup: model, data (encoded once), adapter, optimizer --------------------------------
    resume_from = ckpt.resolve_resume(config.resume, output) if config.resume else None
    model = load_base(config.base)
    resolution = config.resolution or model.native_resolution
    if resolution % model.vae_scale_factor:
        raise ConfigError(
            f"--resolution {resolution} must be a multiple of {model.vae_scale_factor} for this model"
        )
    data = prepare_data(config, model, resolution, device)
    model.release_encoders()  # the VAE and text encoders are not needed again

    unet = model.unet
    add_lora(unet, config.rank, config.alpha, config.targets, seed=config.seed)
    if not lora_parameters(unet):
        raise ConfigError(f"--targets {','.join(config.targets)}: matched no module of the UNet")
    fuse_lora(unet)  # the engine's LoRA layers: split-batch aware, fused kernels on CUDA
    plan = memory_plan_for(config, model, resolution, device, batch=rows.stop - rows.start)
    ctx = apply_memory_plan(
        unet, plan, device, check_inputs=_check_inputs(data, resolution) if plan.compile else None
    )
    log.info("memory plan: %s", ctx.plan.describe())
    unet.train()
    named = lora_named_parameters(unet)
    # The step DDP wraps: its parameters are the LoRA tensors only (see engine/distributed.py).
    step_fn = dist.data_parallel(
        dist.TrainStep(ctx.unet, list(named.values()), step_loss(config.cat_weight)), ranks, device
    )
    optimizer = make_optimizer(list(named.values()), config.lr, ctx.plan, device, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.lr_warmup_steps))
    generator = torch.Generator().manual_seed(config.seed)

    start = 0
    if resume_from is not None:
        start = _restore(resume_from, config, named, optimizer, lr_schedule, generator, ctx.scaler)
    if ranks.main:
        output.mkdir(parents=True, exist_ok=True)
        (output / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    concepts = concept_list(config)
    info = {
        # the first concept's token and class word stay the adapter's default for cat-engine eval
        "token": concepts[0]["token"],
        "class_word": concepts[0]["class_word"],
        "concepts": [{"token": c["token"], "class_word": c["class_word"]} for c in concepts],
        "cat_weight": config.cat_weight,
        "plain_mode": config.plain_mode,
        "base": str(model.path),
        "resolution": resolution,
    }

    def save_state(step: int, sync: bool = True) -> Path:
        """Rank 0 writes; with ``sync`` the others wait for it (not on Ctrl-C: a rank may be gone)."""
        path = output / ckpt.CHECKPOINTS / f"step-{step}"
        if not ranks.main:
            if sync:
                dist.barrier(ranks)
            return path
        state = {
            "config": config.to_dict(),
            "data_position": step * config.batch_size,
            "lr_schedule": lr_schedule.state_dict(),
            "grad_scaler": ctx.scaler.state_dict() if ctx.scaler is not None else None,
        }
        path = ckpt.save_checkpoint(
            output,
            step,
            {n: p for n, p in named.items()},
            optimizer,
            generator,
            state,
            keep=config.keep_checkpoints,
        )
        if sync:
            dist.barrier(ranks)
        return path

    # -- train --------------------------------------------------------------------------------
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not (progress and ranks.main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    step = start
    with open(output / LOG_FILE, "a") if ranks.main else contextlib.nullcontext() as log_file:
        try:
            t0 = time.perf_counter()
            while step < config.steps:
                with ctx.autocast():
                    out = training_step(
                        step_fn, model.noise_scheduler, data, step, config, generator, resolution, rows
                    )
                # The global batch's numbers (one process: its own), so every rank stops alike.
                loss, ldm, cat = dist.all_mean(
                    ranks, torch.stack([out.loss.detach(), out.ldm, out.cat]).float()
                )
                if not torch.isfinite(loss):
                    _stop_non_finite(f"loss is {loss.item()}", step + 1, output, save_state, step, ranks)
                optimizer.zero_grad(set_to_none=True)
                params = list(named.values())
                if ctx.scaler is None:
                    out.loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    if not torch.isfinite(norm):  # gradients are all-reduced: every rank sees this
                        _stop_non_finite(
                            "gradient norm is not finite", step + 1, output, save_state, step, ranks
                        )
                    optimizer.step()
                else:  # fp16: scaled loss; the scaler skips steps whose gradients overflowed
                    ctx.scaler.scale(out.loss).backward()
                    ctx.scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    ctx.scaler.step(optimizer)
                    ctx.scaler.update()
                lr_schedule.step()
                step += 1
                rate = (step - start) / max(time.perf_counter() - t0, 1e-9)
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "ldm": ldm.item(),
                    "cat": cat.item(),
                    "lr": lr_schedule.get_last_lr()[0],
                    "it_s": round(rate, 3),
                }
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                bar.set_postfix(ldm=f"{record['ldm']:.4f}", cat=f"{record['cat']:.2e}", refresh=False)
                bar.update(1)
                if config.save_every and step % config.save_every == 0 and step < config.steps:
                    save_state(step)
        except KeyboardInterrupt:
            bar.close()
            path = save_state(step, sync=False)
            if ranks.main:
                log.warning(
                    "interrupted at step %d: checkpoint written to %s; continue with --resume latest",
                    *(step, path),
                )
            raise
        finally:
            bar.close()

    # -- save ---------------------------------------------------------------------------------
    save_state(step)
    path = output / LORA_WEIGHT_NAME
    if ranks.main:
        path = save_lora(unet, output, {**info, "steps": step})
    dist.barrier(ranks)
    return path


def _stop_non_finite(
    what: str, step: int, output: Path, save_state, good_step: int, ranks: dist.DistContext = dist.SINGLE
):
    """Keep the adapter as it was before ``step`` (the parameters are still untouched) and stop."""
    existing = {p.name for p in ckpt.list_checkpoints(output)}
    path = output / ckpt.CHECKPOINTS / f"step-{good_step}"
    # Rank 0's view decides, so every rank enters the save (and its barrier) or none does.
    if dist.broadcast_object(ranks, good_step > 0 and path.name not in existing):
        path = save_state(good_step)
    where = f"last good checkpoint: {path}" if good_step > 0 else "no step had completed, nothing to keep"
    raise TrainingError(
        f"{what} at step {step}; stopped before updating the adapter ({where}). "
        "Try a lower --lr, --precision fp32 or --max-grad-norm."
    )


def _restore(path: Path, config: TrainConfig, named, optimizer, lr_schedule, generator, scaler=None) -> int:
    loaded = ckpt.load_checkpoint(path)
    state = loaded["state"]
    for line in config_differences(state.get("config", {}), config):
        log.warning("resuming from %s with a different option: %s", path, line)
    missing = sorted(set(named) - set(loaded["lora"]))
    if missing:
        raise ckpt.CheckpointError(
            f"--resume {path}: the checkpoint lacks {len(missing)} LoRA tensors of this model (e.g. {missing[0]}); "
            "was it trained with other --targets or --rank?"
        )
    with torch.no_grad():
        for name, param in named.items():
            saved = loaded["lora"][name]
            if saved.shape != param.shape:
                raise ckpt.CheckpointError(
                    f"--resume {path}: {name} has shape {tuple(saved.shape)}, "
                    f"this model {tuple(param.shape)} (different --rank?)"
                )
            param.copy_(saved)
    optimizer.load_state_dict(loaded["optimizer"])
    lr_schedule.load_state_dict(dict(state["lr_schedule"]))  # lr_lambdas: [None], the lambda is rebuilt
    ckpt.restore_rng(loaded["rng"], generator)
    if scaler is not None and state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags derived from :class:`TrainConfig`; defaults are None so the config file can fill them."""
    help_text = {
        "base": "local diffusers model folder (SD1.x/SD2.x/SDXL); default: the built-in tiny model",
        "data": "folder of concept images (+ optional same-name .txt captions); default: built-in set",
        "token": "trigger token (default: sks)",
        "class_word": "class word of the concept (default: star)",
        "concepts": "repeatable: several concepts in one adapter (instead of --data/--token/--class-word)",
        "caption_template": "caption for images without a .txt (default: 'a photo of {token} {class_word}')",
        "plain_mode": "plain caption for the CAT term: class (token -> class word), strip, empty",
        "cat_weight": "lambda of the CAT term (default 1.0; 0 = plain LoRA)",
        "rank": "LoRA rank (default 16)",
        "alpha": "LoRA alpha (default: the rank, i.e. scale 1)",
        "targets": "comma-separated module names to adapt (default: to_q,to_k,to_v,to_out.0)",
        "lr": "learning rate (default 1e-4)",
        "lr_warmup_steps": "linear warm-up steps (default 0)",
        "max_grad_norm": "gradient clipping norm (default 1.0)",
        "steps": "optimizer steps in total (default 500)",
        "batch_size": "images per step, over all ranks under torchrun: the global batch (default 1)",
        "resolution": "training resolution in pixels (default: the model's native one)",
        "seed": "seed of the adapter init, data order, noise and timesteps (default 0)",
        "flip": "random horizontal flips",
        "precision": "auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16",
        "gradient_checkpointing": "recompute activations in backward (less memory, ~30%% more time)",
        "attention": "attention backend: sdpa, xformers, math",
        "compile": "torch.compile the UNet (its gradients are checked against eager first)",
        "channels_last": "channels-last memory format for convolutions",
        "vram_budget": "e.g. 8GB: pick the fastest memory plan predicted to fit",
        "output": "output folder (default: cat-output)",
        "save_every": "checkpoint every N steps (default 100; 0: only at the end)",
        "keep_checkpoints": "checkpoints to keep (default 3)",
        "resume": "'latest' (newest checkpoint in --output) or a checkpoint folder",
        "device": "auto, cpu, cuda, cuda:1 ...",
    }
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel on N local ranks (GPUs; CPU processes without one) via torchrun",
    )
    parser.add_argument(
        "--manifest",
        metavar="FILE.yaml",
        default=None,
        help="train one adapter per concept listed in FILE.yaml (sharded over the ranks under torchrun)",
    )
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = f.type
        if name == "concepts":  # one flag per concept, each DATA:TOKEN:CLASS
            parser.add_argument(
                "--concept",
                dest=name,
                action="append",
                type=_concept_flag,
                default=None,
                metavar="DATA:TOKEN:CLASS",
                help=help_text[name],
            )
            continue
        if kind == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text[name]
            )
            continue
        caster = {"int": int, "float": float, "int | None": int, "float | None": float}.get(kind, str)
        parser.add_argument(flag, type=caster, default=None, help=help_text[name])


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}
    return build_config(load_yaml(args.config) if args.config else {}, flags)


def _concept_flag(text: str) -> dict:
    # rsplit: the data folder may itself contain ':'; token and class word do not.
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected DATA:TOKEN:CLASS, got {text!r}")
    return {"data": parts[0], "token": parts[1].strip(), "class_word": parts[2].strip()}


def _flags_of(args: argparse.Namespace) -> list[str]:
    """The options of ``args`` as command-line flags again (for relaunching under torchrun)."""
    out = []
    if args.config:
        out += ["--config", args.config]
    if getattr(args, "manifest", None):
        out += ["--manifest", args.manifest]
    for name, f in FIELDS.items():
        value = getattr(args, name, None)
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if name == "concepts":
            out += [a for c in value for a in ("--concept", f"{c['data']}:{c['token']}:{c['class_word']}")]
        elif f.type == "bool":
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    return out


def launch(args: argparse.Namespace) -> int:
    """``--nproc N``: run this very command under torchrun on N local ranks; return its exit code."""
    import subprocess

    if args.nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    if not getattr(args, "manifest", None):
        config = config_from_args(args)  # fail here, once, rather than on every rank
        try:
            dist.local_rows(config.batch_size, dist.DistContext(0, args.nproc))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    command = dist.torchrun_command(args.nproc, "cat_engine", ["train", *_flags_of(args)])
    return subprocess.run(command).returncode


def run(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        if args.nproc and args.nproc > 1 and not dist.launched_by_torchrun():
            return launch(args)
        if args.manifest:
            from cat_engine.cat.manifest import run_manifest

            return run_manifest(args)
        config = config_from_args(args)
        ranks = dist.init_distributed(config.device)
        if not ranks.main:
            log.setLevel(logging.ERROR)  # rank 0 reports; the others would repeat it
        try:
            path = train(config, progress=True, ranks=ranks)
        finally:
            dist.shutdown(ranks)
    except KeyboardInterrupt:
        return 130
    if ranks.main:
        print(f"saved LoRA: {path}" + (f" ({ranks.world} ranks)" if ranks.enabled else ""))
    return 0


class _TqdmHandler(logging.Handler):
    """One line per record on stderr, written through tqdm so progress bars stay intact."""

    def emit(self, record):
        from tqdm.auto import tqdm

        tqdm.write(f"cat-engine: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def setup_logging() -> None:
    """Engine warnings (skipped images, config changes on resume...) as one line each on stderr."""
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        log.addHandler(_TqdmHandler())
    log.setLevel(logging.INFO)
    log.propagate = False
