"""``cat-engine train``: the CAT training recipe, top to bottom: setup, train, save.

    images --(once)--> VAE --> cached latent distributions
    captions --(once)--> text encoder(s) --> cached embeddings of y_T (token) and y (plain)
    each step: noise, t --> z_t --> CatBatch --> cat_loss (one split-batch UNet call) --> backward --> AdamW

:func:`train` is the recipe: :meth:`Trainer.setup` (model, data, adapter, memory plan, optimizer,
resume), :meth:`Trainer.train` (the loop: :meth:`Trainer.run_step` once per step, the log,
periodic checkpoints, Ctrl-C) and :meth:`Trainer.save` (the last checkpoint and the LoRA file).

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch

from cat_engine.cat.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_differences,
    config_from_args,
    flags_of,
)
from cat_engine.cat.data import (
    CachedData,
    compile_check_inputs,
    concept_list,
    draw_batch,
    prepare_data,
    sample_indices,
)
from cat_engine.cat.logs import console_logging
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine import distributed as dist
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import write_text_atomically
from cat_engine.engine.lora import (
    LORA_WEIGHT_NAME,
    add_lora,
    fuse_lora,
    lora_named_parameters,
    lora_parameters,
    save_lora,
)
from cat_engine.engine.memory_plan import MemoryContext, MemoryPlan, apply_memory_plan, make_optimizer
from cat_engine.engine.models import BaseModel, load_base

log = logging.getLogger("cat_engine")
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
# The recipe's keys in a checkpoint's trainer state. engine/checkpoint.py stores the LoRA tensors,
# the optimizer and the RNG states beside them, and adds the step under STEP_KEY.
CONFIG_KEY = "config"
DATA_POSITION_KEY = "data_position"
LR_SCHEDULE_KEY = "lr_schedule"
GRAD_SCALER_KEY = "grad_scaler"
STEP_KEY = "step"
WEIGHT_DECAY = 1e-2


class TrainingError(CatEngineError):
    """Training stopped for a reason the user must see (non-finite loss...)."""


def train(config: TrainConfig, progress: bool = True, ranks: dist.DistContext = dist.SINGLE) -> Path:
    """Run the recipe; return the path of the saved LoRA. Raises the engine's user errors.

    ``ranks``: the torchrun group this process belongs to (:func:`dist.init_distributed`); every
    rank calls ``train`` with the same config.
    """
    trainer = Trainer.setup(config, ranks)
    trainer.train(progress)
    return trainer.save()


@dataclass
class Trainer:
    """The state of one training run; :func:`train` calls its methods in order."""

    config: TrainConfig
    ranks: dist.DistContext
    rows: slice  # this rank's rows of the global batch
    model: BaseModel  # its UNet carries the adapter; the VAE and text encoders are released
    resolution: int
    data: CachedData
    lora: dict[str, torch.nn.Parameter]  # the trained tensors, by name
    memory: MemoryContext
    step_fn: torch.nn.Module  # the CAT loss of a batch (CatStep), DDP-wrapped on several ranks
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 loss scaling; otherwise a disabled scaler, which does nothing
    generator: torch.Generator  # every random draw of the loop: noise and timesteps
    step: int = 0  # optimizer steps completed
    # The generator's state when the step in progress began (None between steps): a step that is
    # abandoned (Ctrl-C, a non-finite loss) gives its draws back, so a checkpoint of the steps
    # completed resumes exactly where a straight run would be.
    step_rng: torch.Tensor | None = None

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    # -------------------------------------------------------------------------------- setup
    @classmethod
    def setup(cls, config: TrainConfig, ranks: dist.DistContext = dist.SINGLE) -> Trainer:
        """Model, data (encoded once), adapter, memory plan, optimizer; then the checkpoint to resume."""
        device = dist.device_for(config.device, ranks)
        rows = rank_rows(config.batch_size, ranks)
        torch.manual_seed(config.seed)
        resume_from = ckpt.resolve_resume(config.resume, config.output) if config.resume else None
        model = load_base(config.base)
        resolution = training_resolution(config, model)
        data = prepare_data(config, model, resolution, device)
        model.release_encoders()  # the VAE and text encoders are not needed again

        add_adapter(model.unet, config)
        plan = memory_plan_for(config, model, resolution, device, batch=rows.stop - rows.start)
        check_inputs = compile_check_inputs(data, resolution) if plan.compile else None
        ctx = apply_memory_plan(model.unet, plan, device, check_inputs=check_inputs)
        log.info("memory plan: %s", ctx.plan.describe())
        model.unet.train()
        named = lora_named_parameters(model.unet)
        # The step DDP wraps: its parameters are the LoRA tensors only (see engine/distributed.py).
        step_fn = dist.data_parallel(
            dist.CatStep(ctx.unet, list(named.values()), config.cat_weight), ranks, device
        )
        optimizer = make_optimizer(
            list(named.values()), config.lr, ctx.plan, device, weight_decay=WEIGHT_DECAY
        )
        trainer = cls(
            config=config,
            ranks=ranks,
            rows=rows,
            model=model,
            resolution=resolution,
            data=data,
            lora=named,
            memory=ctx,
            step_fn=step_fn,
            optimizer=optimizer,
            lr_schedule=torch.optim.lr_scheduler.LambdaLR(optimizer, warmup(config.lr_warmup_steps)),
            scaler=ctx.scaler or torch.amp.GradScaler(enabled=False),
            generator=torch.Generator().manual_seed(config.seed),
        )
        if resume_from is not None:
            trainer.restore(resume_from)
        if ranks.main:
            write_text_atomically(trainer.output / CONFIG_FILE, json.dumps(config.to_dict(), indent=1))
        return trainer

    def restore(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: LoRA tensors, optimizer, schedule, RNG, loss scale, step."""
        loaded = ckpt.load_checkpoint(path)
        state = loaded["state"]
        for line in config_differences(state.get(CONFIG_KEY, {}), self.config):
            log.warning("resuming from %s with a different option: %s", path, line)
        missing = sorted(set(self.lora) - set(loaded["lora"]))
        if missing:
            raise ckpt.CheckpointError(
                f"--resume {path}: the checkpoint lacks {len(missing)} LoRA tensors of this model (e.g. {missing[0]}); "
                "was it trained with other --targets or --rank?"
            )
        with torch.no_grad():
            for name, param in self.lora.items():
                saved = loaded["lora"][name]
                if saved.shape != param.shape:
                    raise ckpt.CheckpointError(
                        f"--resume {path}: {name} has shape {tuple(saved.shape)}, "
                        f"this model {tuple(param.shape)} (different --rank?)"
                    )
                param.copy_(saved)
        self.optimizer.load_state_dict(loaded["optimizer"])
        # lr_lambdas are saved as [None]: the warm-up function is rebuilt by setup, not loaded
        self.lr_schedule.load_state_dict(dict(state[LR_SCHEDULE_KEY]))
        ckpt.restore_rng(loaded["rng"], self.generator)
        if self.scaler.is_enabled() and state.get(GRAD_SCALER_KEY):
            self.scaler.load_state_dict(state[GRAD_SCALER_KEY])
        self.step = int(state[STEP_KEY])
        log.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------------------- one step
    def run_step(self) -> torch.Tensor:
        """One optimizer step on this step's samples; returns the global batch's ``[loss, ldm, cat]``."""
        self.step_rng = self.generator.get_state()
        indices = sample_indices(self.step, self.config.batch_size, len(self.data), self.config.seed)
        b = draw_batch(
            self.data, indices, self.generator, self.model.noise_scheduler, self.resolution, self.rows
        )
        # Set before the forward; no random draw depends on it, so the RNG stream is the same
        # whether this step runs the CAT rows or not (and a resume stays exact).
        getattr(self.step_fn, "module", self.step_fn).cat_weight = self.step_cat_weight()
        with self.memory.autocast():
            loss, ldm, cat = self.step_fn(
                b.noisy_latents,
                b.timesteps,
                b.token_embeds,
                b.plain_embeds,
                b.target,
                b.added_cond_kwargs,
                b.plain_added_cond_kwargs,
            )
        # The global batch's numbers (one process: its own), so every rank stops alike.
        losses = dist.all_mean(self.ranks, torch.stack([loss.detach(), ldm, cat]).float())
        if not torch.isfinite(losses[0]):
            self.stop_non_finite(f"loss is {losses[0].item()}")
        self.update(loss)
        self.step, self.step_rng = self.step + 1, None
        return losses

    def step_cat_weight(self) -> float:
        """Lambda of the step in progress: ``k * cat_weight`` on every k-th step (from the first), else 0.

        With ``cat_every = k`` the CAT rows run on one step in k with k times the weight, so the
        expected gradient is the one of ``k = 1``; the steps between are plain LoRA steps.
        """
        k = self.config.cat_every
        return self.config.cat_weight * k if self.step % k == 0 else 0.0

    def update(self, loss: torch.Tensor) -> None:
        """Backward, clip, optimizer and schedule step.

        fp16: the loss is scaled, and the scaler skips a step whose gradients overflowed. Otherwise
        the scaler passes everything through, and a non-finite gradient norm stops the run.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(list(self.lora.values()), self.config.max_grad_norm)
        if not (self.scaler.is_enabled() or torch.isfinite(norm)):  # all-reduced: every rank sees it
            self.stop_non_finite("gradient norm is not finite")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()

    def stop_non_finite(self, what: str) -> NoReturn:
        """Keep the adapter as it was before this step (its parameters are still untouched) and stop."""
        self.abandon_step()
        existing = {p.name for p in ckpt.list_checkpoints(self.output)}
        path = self.output / ckpt.CHECKPOINTS / f"step-{self.step}"
        # Rank 0's view decides, so every rank enters the save (and its barrier) or none does.
        if dist.broadcast_object(self.ranks, self.step > 0 and path.name not in existing):
            path = self.save_checkpoint()
        where = f"last good checkpoint: {path}" if self.step > 0 else "no step had completed, nothing to keep"
        raise TrainingError(
            f"{what} at step {self.step + 1}; stopped before updating the adapter ({where}). "
            "Try a lower --lr, --precision fp32 or --max-grad-norm."
        )

    def abandon_step(self) -> None:
        """Give back the draws of the step in progress, if any (its update has not been applied)."""
        if self.step_rng is not None:
            self.generator.set_state(self.step_rng)
            self.step_rng = None

    # ---------------------------------------------------------------------------- the loop
    def train(self, progress: bool = True) -> None:
        """Steps until ``config.steps``: a log line each, a checkpoint every ``save_every``.

        Ctrl-C writes a checkpoint of the last completed step (``--resume latest`` continues it) and
        re-raises.
        """
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            disable=not (progress and self.ranks.main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        with open(self.output / LOG_FILE, "a") if self.ranks.main else contextlib.nullcontext() as log_file:
            try:
                start, t0 = self.step, time.perf_counter()
                while self.step < self.config.steps:
                    loss, ldm, cat = self.run_step()
                    record = {
                        "step": self.step,
                        "loss": loss.item(),
                        "ldm": ldm.item(),
                        "cat": cat.item(),
                        "lr": self.lr_schedule.get_last_lr()[0],
                        "it_s": round((self.step - start) / max(time.perf_counter() - t0, 1e-9), 3),
                    }
                    if log_file is not None:
                        log_file.write(json.dumps(record) + "\n")
                        log_file.flush()
                    bar.set_postfix(ldm=f"{record['ldm']:.4f}", cat=f"{record['cat']:.2e}", refresh=False)
                    bar.update(1)
                    every = self.config.save_every
                    if every and self.step % every == 0 and self.step < self.config.steps:  # the last: save()
                        self.save_checkpoint()
            except KeyboardInterrupt:
                bar.close()
                self.abandon_step()
                path = self.save_checkpoint(sync=False)
                if self.ranks.main:
                    log.warning(
                        "interrupted at step %d: checkpoint written to %s; continue with --resume latest",
                        *(self.step, path),
                    )
                raise
            finally:
                bar.close()

    # -------------------------------------------------------------------------------- save
    def save_checkpoint(self, sync: bool = True) -> Path:
        """``checkpoints/step-N`` of the current step.

        Rank 0 writes; with ``sync`` the others wait for it (not on Ctrl-C: a rank may be gone).
        """
        path = self.output / ckpt.CHECKPOINTS / f"step-{self.step}"
        if self.ranks.main:
            state = {
                CONFIG_KEY: self.config.to_dict(),
                DATA_POSITION_KEY: self.step * self.config.batch_size,
                LR_SCHEDULE_KEY: self.lr_schedule.state_dict(),
                GRAD_SCALER_KEY: self.scaler.state_dict() if self.scaler.is_enabled() else None,
            }
            path = ckpt.save_checkpoint(
                self.output,
                self.step,
                dict(self.lora),
                self.optimizer,
                self.generator,
                state,
                keep=self.config.keep_checkpoints,
            )
        if sync:
            dist.barrier(self.ranks)
        return path

    def save(self) -> Path:
        """The last checkpoint, then the LoRA file with the metadata ``cat-engine eval`` reads; its path."""
        self.save_checkpoint()
        path = self.output / LORA_WEIGHT_NAME
        if self.ranks.main:
            info = adapter_metadata(self.config, self.model, self.resolution)
            path = save_lora(self.model.unet, self.output, {**info, "steps": self.step})
        dist.barrier(self.ranks)
        return path


# --------------------------------------------------------------------------- setup's parts
def rank_rows(batch_size: int, ranks: dist.DistContext) -> slice:
    """This rank's rows of the global batch; a batch that does not divide by the ranks is a config error."""
    try:
        return dist.local_rows(batch_size, ranks)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def training_resolution(config: TrainConfig, model: BaseModel) -> int:
    resolution = config.resolution or model.native_resolution
    if resolution % model.vae_scale_factor:
        raise ConfigError(
            f"--resolution {resolution} must be a multiple of {model.vae_scale_factor} for this model"
        )
    return resolution


def add_adapter(unet, config: TrainConfig) -> None:
    """The LoRA layers of ``config`` on ``unet``, as the engine's layers (split-batch aware, fused kernels on CUDA)."""
    add_lora(unet, config.rank, config.alpha, config.targets, seed=config.seed)
    if not lora_parameters(unet):
        raise ConfigError(f"--targets {','.join(config.targets)}: matched no module of the UNet")
    fuse_lora(unet)


def memory_plan_for(
    config: TrainConfig, model, resolution: int, device, batch: int | None = None
) -> MemoryPlan:
    """``config.memory``, or with ``--vram-budget`` the fastest plan predicted to fit.

    ``batch``: the rows one device runs (the global batch over the ranks); default ``--batch-size``.
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
            cat=config.cat_weight != 0,
            half=half,
            attention=config.memory.attention,
        )
    except vram.NoPlanFits as exc:
        raise ConfigError(f"--vram-budget {config.vram_budget}: {exc}") from None
    log.info("--vram-budget %s: predicted peak %s", config.vram_budget, vram.format_bytes(estimate.total))
    return dataclasses.replace(plan, compile=config.memory.compile, channels_last=config.memory.channels_last)


def warmup(steps: int):
    """The learning-rate factor of step ``s``: linear from ``1/steps`` to 1 over ``steps`` steps."""
    return lambda s: min(1.0, (s + 1) / steps) if steps > 0 else 1.0


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
        "resolution": resolution,
    }


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    add_config_arguments(parser)


def launch(args: argparse.Namespace) -> int:
    """``--nproc N``: run this very command under torchrun on N local ranks; return its exit code."""
    import subprocess

    if args.nproc < 1:
        raise ConfigError("--nproc must be >= 1")
    if not args.manifest:
        config = config_from_args(args)  # fail here, once, rather than on every rank
        rank_rows(config.batch_size, dist.DistContext(0, args.nproc))
    manifest = ["--manifest", args.manifest] if args.manifest else []
    command = dist.torchrun_command(args.nproc, "cat_engine", ["train", *manifest, *flags_of(args)])
    return subprocess.run(command).returncode


def run(args: argparse.Namespace) -> int:
    with console_logging():
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
