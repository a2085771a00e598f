"""``cat-engine train``: the CAT training recipe, top to bottom: setup, train, save.

    images --(once)--> VAE --> cached latent distributions
    captions --(once)--> text encoder(s) --> cached embeddings of y_T (token) and y (plain)
    each step: noise, t --> z_t --> CatBatch --> cat_loss (one split-batch UNet call) --> backward --> AdamW

:func:`train` is the recipe: :meth:`Trainer.setup` (the output folder claimed for this run, model,
data, adapter, memory plan, optimizer, resume), :meth:`Trainer.train` (the loop:
:meth:`Trainer.run_step` once per step, the log, periodic checkpoints, SIGINT/SIGTERM at step
boundaries) and :meth:`Trainer.save` (the last checkpoint and the LoRA file). What the setup decides
(targets, resolution, adapter, memory plan, schedule, metadata) is in cat/train_setup.py.

Also runnable as ``python -m cat_engine train``, and data-parallel under torchrun
(``torchrun --nproc_per_node N -m cat_engine train ...``, or ``cat-engine train --nproc N``, on one
machine or several: cat/launch.py):
``--batch-size`` is the global batch; every rank draws the whole batch's randomness from the same
seeded generator and keeps its own equal slice of rows, DDP averages the LoRA gradients, so N ranks
train the adapter a single process would (up to float rounding). Rank 0 writes every output.
Several concepts can share one adapter (``concepts`` in the config); ``--manifest`` trains one
adapter per concept instead (cat/manifest.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from cat_engine.cat.buckets import BatchSampler
from cat_engine.cat.config import (
    IDENTITY,
    TrainConfig,
    add_config_arguments,
    config_differences,
    config_from_args,
)
from cat_engine.cat.data import (
    CachedData,
    NoiseOptions,
    compile_check_inputs,
    concept_list,
    draw_batch,
    draw_rows,
    micro_batches,
    prepare_data,
)
from cat_engine.cat.launch import add_launch_arguments, launch, rank_rows, wants_torchrun
from cat_engine.cat.logs import console_logging
from cat_engine.cat.loss_options import training_loss
from cat_engine.cat.output_folder import (
    CONFIG_FILE,
    CONFIG_KEY,
    LOG_FILE,
    STEP_KEY,
    TrainLog,
    prepare_output,
)
from cat_engine.cat.stopping import NonFiniteAdapter, Stopping, TrainingError
from cat_engine.cat.text_encoder_lora import (
    adapted_text_loss,
    add_text_encoder_lora,
    check_text_encoder_training,
    text_encoder_adapters,
    text_encoder_lora_parameters,
)
from cat_engine.cat.tracking import Tracker, make_tracker, memory_gib
from cat_engine.cat.train_samples import TrainSamples
from cat_engine.cat.train_setup import (
    adapter_metadata,
    add_adapter,
    check_family_options,
    lr_schedule,
    memory_plan_for,
    no_sync,
    release_encoders,
    training_resolution,
    with_model_targets,
    with_total_steps,
)
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine import distributed as dist
from cat_engine.engine import signals
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.cache import CaptionCache
from cat_engine.engine.cuda_graphs import GraphedTrainStep, check_cuda_graphs
from cat_engine.engine.files import WRITE_ERRORS, WriteError, os_error_text, write_text_atomically
from cat_engine.engine.kohya import kohya_file_name
from cat_engine.engine.lora import (
    LORA_WEIGHT_NAME,
    lora_named_parameters,
    save_lora_files,
)
from cat_engine.engine.memory_plan import (
    MemoryContext,
    apply_memory_plan,
    make_optimizer,
    resolve_precision,
)
from cat_engine.engine.models import BaseModel, load_base
from cat_engine.engine.run_folder import RunLock

log = logging.getLogger("cat_engine")
# The recipe's keys in a checkpoint's trainer state (CONFIG_KEY, STEP_KEY: cat/output_folder.py).
# engine/checkpoint.py stores the LoRA tensors, the optimizer and the RNG states beside them.
DATA_POSITION_KEY = "data_position"
LR_SCHEDULE_KEY = "lr_schedule"
GRAD_SCALER_KEY = "grad_scaler"


def train(config: TrainConfig, progress: bool = True, ranks: dist.DistContext = dist.SINGLE) -> Path:
    """Run the recipe; return the path of the saved LoRA. Raises the engine's user errors, and
    :class:`~cat_engine.engine.signals.Interrupted` (a ``KeyboardInterrupt``) on SIGINT or SIGTERM.

    ``ranks``: the torchrun group this process belongs to (:func:`dist.init_distributed`); every
    rank calls ``train`` with the same config.
    """
    stop = signals.StopRequest()
    with signals.stop_on_signals(stop):
        trainer = Trainer.setup(config, ranks, stop)
        try:
            trainer.train(progress)
            return trainer.save()
        finally:
            trainer.close()


@dataclass
class Trainer(Stopping):
    """The state of one training run; :func:`train` calls its methods in order (how a run stops
    and says what it kept: :class:`~cat_engine.cat.stopping.Stopping`)."""

    config: TrainConfig
    ranks: dist.DistContext
    rows: slice  # this rank's rows of the global batch
    model: BaseModel  # its UNet carries the adapter; the VAE and text encoders are released
    # (the text encoders stay, with their own adapter, under --train-text-encoder)
    resolution: int
    data: CachedData
    sampler: BatchSampler  # the rows of each step, a pure function of the step
    lora: dict[str, torch.nn.Parameter]  # the trained tensors, by name
    memory: MemoryContext
    step_fn: torch.nn.Module  # the CAT loss of a batch (TrainStep), DDP-wrapped on several ranks
    step_losses: tuple  # the step's loss without, with the CAT rows (runs_cat_rows picks)
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # fp16 loss scaling; otherwise a disabled scaler, which does nothing
    generator: torch.Generator  # every random draw of the loop: noise and timesteps
    step: int = 0  # optimizer steps completed
    # The generator's state when the step in progress began (None between steps): a step that is
    # abandoned (Ctrl-C, a non-finite loss) gives its draws back, so a checkpoint of the steps
    # completed resumes exactly where a straight run would be.
    step_rng: torch.Tensor | None = None
    updating: bool = False  # the step in progress has begun to change the adapter (optimizer step)
    stop: signals.StopRequest = field(default_factory=signals.StopRequest)  # set by SIGINT/SIGTERM
    lock: RunLock | None = None  # rank 0's hold on the output folder
    last_checkpoint: Path | None = None  # the newest checkpoint of this run (written or resumed from)
    saved_step: int | None = None  # the step it holds
    graphed: GraphedTrainStep | None = None  # --cuda-graphs: the captured step, else None
    samples: TrainSamples | None = None  # --sample-every (rank 0)
    tracker: Tracker = field(default_factory=Tracker)  # --log-with (rank 0)
    grad_norm: torch.Tensor | None = None  # of the last update, before clipping

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    @property
    def epochs(self) -> int:
        """Epochs the run covers (the last may be partial)."""
        return -(-self.config.steps // self.sampler.steps_per_epoch)

    # -------------------------------------------------------------------------------- setup
    @classmethod
    def setup(
        cls,
        config: TrainConfig,
        ranks: dist.DistContext = dist.SINGLE,
        stop: signals.StopRequest | None = None,
    ) -> Trainer:
        """The output folder claimed for this run (cat/output_folder.py: lock, refusals, the
        checkpoint to resume), then :meth:`build`. Call :meth:`close` at the end (``train`` does)."""
        if config.cuda_graphs:  # refused before the output folder is touched, when it cannot run
            device = dist.device_for(config.device, ranks)
            precision = resolve_precision(config.memory, device).name if device.type == "cuda" else None
            check_cuda_graphs(
                device, world=ranks.world, compile_mode=config.memory.compile, precision=precision
            )
        lock, resume_from = prepare_output(config, ranks)
        try:
            trainer = cls.build(config, ranks, resume_from)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        trainer.lock, trainer.stop = lock, stop or trainer.stop
        return trainer

    def close(self) -> None:
        """Let the output folder go (another run may use it)."""
        if self.lock is not None:
            self.lock.release()

    @classmethod
    def build(cls, config: TrainConfig, ranks: dist.DistContext, resume_from: Path | None) -> Trainer:
        """Model, data (encoded once), adapter, memory plan, optimizer; then the checkpoint to resume."""
        device = dist.device_for(config.device, ranks)
        rows = rank_rows(config.batch_size, ranks)
        torch.manual_seed(config.seed)
        model = load_base(config.base)
        config = with_model_targets(config, model)
        check_family_options(config, model)
        if config.train_text_encoder:
            check_text_encoder_training(model)
        resolution = training_resolution(config, model)
        data = prepare_data(config, model, resolution, device)
        samples = None
        if config.sample_every and ranks.main:  # keeps the VAE and text encoders it samples with
            live = not isinstance(data.texts, CaptionCache) or config.train_text_encoder
            samples = TrainSamples(
                config, model, concept_list(config), resolution, device, park_text=not live
            )
        release_encoders(model, data, keep_text=config.train_text_encoder)
        sampler = data.sampler(config.batch_size * config.gradient_accumulation_steps, config.seed)
        config = with_total_steps(config, sampler)

        add_adapter(model.unet, config)
        if config.train_text_encoder:
            add_text_encoder_lora(model, config.rank, config.alpha, config.seed)
        plan = memory_plan_for(config, model, resolution, device, batch=rows.stop - rows.start)
        check_inputs = compile_check_inputs(data) if plan.compile else None
        ctx = apply_memory_plan(model.unet, plan, device, check_inputs=check_inputs)
        log.info("memory plan: %s", ctx.plan.describe())
        model.unet.train()
        named = {**lora_named_parameters(model.unet), **text_encoder_lora_parameters(model)}
        # Without / with the CAT rows (--cat-every k: k x the weight on every k-th step).
        step_losses = tuple(
            training_loss(w, config.min_snr_gamma, model.noise_scheduler)
            for w in (0.0, config.cat_weight * config.cat_every)
        )
        if config.train_text_encoder:  # each step encodes its captions with the adapted encoders
            step_losses = tuple(adapted_text_loss(f, model) for f in step_losses)
        # The step DDP wraps: its parameters are the LoRA tensors only (see engine/distributed.py).
        step_fn = dist.data_parallel(
            dist.TrainStep(ctx.unet, list(named.values()), step_losses[True]), ranks, device
        )
        graphs = {"capturable": True} if config.cuda_graphs else {}
        optimizer = make_optimizer(
            list(named.values()),
            config.lr,
            ctx.plan,
            device,
            name=config.optimizer,
            weight_decay=config.weight_decay,
            **graphs,
        )
        trainer = cls(
            config=config,
            ranks=ranks,
            rows=rows,
            model=model,
            resolution=resolution,
            data=data,
            sampler=sampler,
            lora=named,
            memory=ctx,
            step_fn=step_fn,
            step_losses=step_losses,
            optimizer=optimizer,
            lr_schedule=lr_schedule(optimizer, config),
            scaler=ctx.scaler or torch.amp.GradScaler(enabled=False),
            generator=torch.Generator().manual_seed(config.seed),
            samples=samples,
        )
        if resume_from is not None:
            trainer.restore(resume_from)
        if config.cuda_graphs:
            check_cuda_graphs(device, precision=ctx.plan.precision)  # --vram-budget may have chosen it
            trainer.graphed = GraphedTrainStep(
                step_fn,
                list(named.values()),
                optimizer,
                max_grad_norm=config.max_grad_norm,
                autocast=ctx.autocast,
            )
        if ranks.main:
            write_text_atomically(trainer.output / CONFIG_FILE, json.dumps(config.to_dict(), indent=1))
        trainer.tracker = make_tracker(config, ranks.main)
        return trainer

    def restore(self, path: Path) -> None:
        """Continue from the checkpoint at ``path``: LoRA tensors, optimizer, schedule, RNG, loss scale, step."""
        loaded = ckpt.load_checkpoint(path)
        state = loaded["state"]
        # the run's identity was checked before setup (cat/output_folder.py); the rest may change
        for line in config_differences(state.get(CONFIG_KEY, {}), self.config, ignore=IDENTITY):
            log.warning("resuming from %s with a different option: %s", path, line)
        missing = sorted(set(self.lora) - set(loaded["lora"]))
        if missing:
            raise ckpt.CheckpointError(
                f"--resume {path}: the checkpoint lacks {len(missing)} LoRA tensors of this model (e.g. {missing[0]}); "
                "was it trained with other --targets or --rank?"
            )
        extra = sorted(set(loaded["lora"]) - set(self.lora))
        if extra:  # they would be dropped without a word
            raise ckpt.CheckpointError(
                f"--resume {path}: the checkpoint has {len(extra)} LoRA tensors this model does not adapt "
                f"(e.g. {extra[0]}); was it trained with other --targets?"
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
        # lr_lambdas are saved as [None]: the schedule's function is rebuilt by setup, not loaded
        self.lr_schedule.load_state_dict(dict(state[LR_SCHEDULE_KEY]))
        ckpt.restore_rng(loaded["rng"], self.generator)
        if self.scaler.is_enabled() and state.get(GRAD_SCALER_KEY):
            self.scaler.load_state_dict(state[GRAD_SCALER_KEY])
        self.step = int(state[STEP_KEY])
        self.last_checkpoint, self.saved_step = path, self.step
        log.info("resumed from %s at step %d", path, self.step)

    # ---------------------------------------------------------------------------- one step
    def run_step(self) -> torch.Tensor:
        """One optimizer step on this step's samples; returns the global batch's ``[loss, ldm, cat]``.

        With ``--gradient-accumulation-steps K`` the step's batch is K micro-batches whose
        gradients add up (DDP synchronises on the last only): the same update as one batch of K
        times the rows, since the K batches are cut from one draw of all of them.
        """
        self.step_rng = self.generator.get_state()
        batches = self.draw()
        if self.graphed is not None:  # one micro-batch: --cuda-graphs refuses accumulation
            return self.run_graphed_step(batches[0])
        # Set before the forward; no random draw depends on it, so the RNG stream is the same
        # whether this step runs the CAT rows or not (and a resume stays exact).
        getattr(self.step_fn, "module", self.step_fn).loss_fn = self.step_losses[self.runs_cat_rows()]
        k = len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0
        for i, b in enumerate(batches):
            last = i == k - 1
            with contextlib.nullcontext() if last else no_sync(self.step_fn):
                with self.memory.autocast():
                    loss, ldm, cat = self.step_fn(b)
                # The global batch's numbers (one process: its own), so every rank stops alike.
                losses = dist.all_mean(self.ranks, torch.stack([loss.detach(), ldm, cat]).float())
                if not torch.isfinite(losses[0]):
                    self.stop_non_finite(f"loss is {losses[0].item()}")
                loss = loss / k if k > 1 else loss
                if last:
                    self.update(loss)
                else:
                    self.scaler.scale(loss).backward()
            total = total + losses
        self.step, self.step_rng, self.updating = self.step + 1, None, False
        return total / k if k > 1 else total

    def run_graphed_step(self, b) -> torch.Tensor:
        """The step through the captured CUDA graph (forward to optimizer in one replay); a step whose
        loss or gradient norm is not finite is undone before the run stops."""
        self.updating = True  # one replay runs forward to optimizer step
        loss, ldm, cat, norm = self.graphed(b)
        losses = torch.stack([loss, ldm, cat]).float()
        if not (torch.isfinite(losses[0]) and torch.isfinite(norm)):
            self.graphed.undo()
            self.updating = False  # undone: the adapter is as it was before the step
            what = (
                f"loss is {losses[0].item()}"
                if not torch.isfinite(losses[0])
                else "gradient norm is not finite"
            )
            self.stop_non_finite(what)
        self.grad_norm = norm
        self.lr_schedule.step()
        self.step, self.step_rng, self.updating = self.step + 1, None, False
        return losses

    def runs_cat_rows(self) -> bool:
        """Whether the step in progress runs the CAT rows: every k-th step (from the first) with
        ``--cat-every k``, at ``k * --cat-weight`` (so the expected gradient is the one of ``k = 1``);
        the steps between are plain LoRA steps."""
        return self.step % self.config.cat_every == 0

    def draw(self) -> list[CatBatch]:
        """This step's micro-batches (one without accumulation): this rank's rows of each
        (:class:`~cat_engine.cat.data.DrawnBatch` es, with their captions, under --train-text-encoder)."""
        indices = self.sampler.indices(self.step)
        noise = NoiseOptions(self.config.noise_offset)
        scheduler, k, size = (
            self.model.noise_scheduler,
            self.config.gradient_accumulation_steps,
            self.config.batch_size,
        )
        rows = self.rows
        if k > 1:
            rows = torch.cat([torch.arange(i * size, (i + 1) * size)[self.rows] for i in range(k)])
        if self.config.train_text_encoder:  # the rows' captions go with them: the step encodes them
            return draw_rows(self.data, indices, self.generator, scheduler, rows, noise).split(k)
        return micro_batches(draw_batch(self.data, indices, self.generator, scheduler, rows, noise), k)

    def update(self, loss: torch.Tensor) -> None:
        """Backward (adding to the gradients of earlier micro-batches), clip, optimizer and schedule step.

        fp16: the loss is scaled, and the scaler skips a step whose gradients overflowed. Otherwise
        the scaler passes everything through, and a non-finite gradient norm stops the run.
        """
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(list(self.lora.values()), self.config.max_grad_norm)
        self.grad_norm = norm
        if not (self.scaler.is_enabled() or torch.isfinite(norm)):  # all-reduced: every rank sees it
            self.stop_non_finite("gradient norm is not finite")
        self.updating = True  # from here on, abandoning the step would leave a half-updated adapter
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()

    def stop_non_finite(self, what: str) -> NoReturn:
        """Keep the adapter as it was before this step (its parameters are still untouched) and stop."""
        self.abandon_step()
        if self.step == 0:
            kept = "no step had completed, nothing to keep"
        else:
            try:
                kept = f"last good checkpoint: {self.checkpoint_of_this_step()}"
            except NonFiniteAdapter:
                kept = f"the adapter was already non-finite after step {self.step}, not saved; {self.last_good()}"
        raise TrainingError(
            f"{what} at step {self.step + 1}; stopped before updating the adapter ({kept}). "
            "Try a lower --lr, --precision fp32 or --max-grad-norm."
        )

    def abandon_step(self) -> None:
        """Give back the draws of the step in progress, if any (its update has not been applied)."""
        if self.step_rng is not None:
            self.generator.set_state(self.step_rng)
            self.step_rng = None

    # ---------------------------------------------------------------------------- the loop
    def train(self, progress: bool = True) -> None:
        """Steps until ``config.steps``: a log line each, a checkpoint every ``save_every``; a stop
        request (SIGINT, SIGTERM) at the next step boundary, a second signal at once (cat/stopping.py).
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
        with self.stop.deferred(), TrainLog(self.output / LOG_FILE, self.ranks.main) as log_file:
            try:
                start, t0 = self.step, time.perf_counter()
                while self.step < self.config.steps and not self.stop_agreed():
                    lr = self.lr_schedule.get_last_lr()[0]  # the rate this step uses
                    loss, ldm, cat = self.run_step()
                    record = {
                        "step": self.step,
                        "epoch": self.sampler.epoch_of(self.step - 1) + 1,
                        "loss": loss.item(),
                        "ldm": ldm.item(),
                        "cat": cat.item(),
                        "lr": lr,
                        "it_s": round((self.step - start) / max(time.perf_counter() - t0, 1e-9), 3),
                        "grad_norm": self.grad_norm.item(),
                        "memory_gib": memory_gib(self.memory.device),
                    }
                    log_file.write(record, self.last_good)
                    bar.set_description(f"train epoch {record['epoch']}/{self.epochs}", refresh=False)
                    bar.set_postfix(ldm=f"{record['ldm']:.4f}", cat=f"{record['cat']:.2e}", refresh=False)
                    bar.update(1)
                    self.tracker.log(self.step, record)
                    if self.samples is not None and self.samples.due(self.step):
                        self.tracker.log_image(
                            self.step, "samples", self.samples.write(self.step, self.memory.autocast)
                        )
                    every = self.config.save_every
                    if every and self.step % every == 0 and self.step < self.config.steps:  # the last: save()
                        self.save_checkpoint()
            except signals.Aborted as exc:
                raise signals.Aborted(
                    exc.signum, f"{exc} during step {self.step + 1}, nothing more written; {self.last_good()}"
                ) from None
            except signals.Interrupted:
                raise
            except KeyboardInterrupt:
                raise self.interrupted_mid_step() from None
            finally:
                bar.close()
                self.tracker.close()
        if self.step < self.config.steps:  # stopped on request
            raise self.interrupted()

    # -------------------------------------------------------------------------------- save
    def save_checkpoint(self, sync: bool = True) -> Path:
        """``checkpoints/step-N`` of the current step. Rank 0 writes; with ``sync`` the others wait and
        learn whether it failed (not on a stray ``KeyboardInterrupt``: a rank may be gone). A
        non-finite state (:class:`NonFiniteAdapter`) or a refusing disk (:class:`TrainingError`)
        writes nothing; the message names the newest checkpoint, which is kept."""
        path = self.output / ckpt.CHECKPOINTS / f"step-{self.step}"
        error = None
        if self.ranks.main:
            state = {
                CONFIG_KEY: self.config.to_dict(),
                DATA_POSITION_KEY: self.step * self.sampler.batch_size,  # samples read, every micro-batch
                LR_SCHEDULE_KEY: self.lr_schedule.state_dict(),
                GRAD_SCALER_KEY: self.scaler.state_dict() if self.scaler.is_enabled() else None,
            }
            try:
                path = ckpt.save_checkpoint(
                    self.output,
                    self.step,
                    dict(self.lora),
                    self.optimizer,
                    self.generator,
                    state,
                    keep=self.config.keep_checkpoints,
                    extra=self.write_lora,  # a loadable LoRA in every checkpoint
                )
            except ckpt.CheckpointError as exc:
                error = exc
        if sync:
            error = dist.broadcast_object(self.ranks, error)
        if error is not None:
            kind = NonFiniteAdapter if isinstance(error, ckpt.NonFiniteState) else TrainingError
            raise kind(f"{error}; {self.last_good()}")
        self.last_checkpoint, self.saved_step = path, self.step
        return path

    def save(self) -> Path:
        """The last checkpoint, then the LoRA files of ``--save-format``; the path of the first.
        A signal while saving waits for the save to finish (the run is then complete)."""
        with self.stop.deferred():
            self.checkpoint_of_this_step()
            paths, error = [], None
            if self.ranks.main:
                try:
                    paths = self.write_lora(self.output)
                except WRITE_ERRORS as exc:
                    error = WriteError(
                        f"{self.output}: cannot write the LoRA files ({os_error_text(exc)}); the run is "
                        f"complete in {self.last_checkpoint}: free space and run again with --resume latest"
                    )
            error = dist.broadcast_object(self.ranks, error)
            if error is not None:
                raise error
        return paths[0] if paths else self.output / LORA_WEIGHT_NAME

    def write_lora(self, folder: Path) -> list[Path]:
        """The LoRA files (``--save-format``) with the metadata ``cat-engine eval`` and other tools
        read, into ``folder`` (the output, or a checkpoint being written); the kohya file is named
        after the run's output folder."""
        info = {**adapter_metadata(self.config, self.model, self.resolution), "steps": self.step}
        name = kohya_file_name(self.output)
        extra = text_encoder_adapters(self.model)  # --train-text-encoder: in the same files
        return save_lora_files(self.model.unet, folder, self.config.save_format, info, name=name, extra=extra)


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_launch_arguments(parser)
    parser.add_argument(
        "--manifest",
        metavar="FILE.yaml",
        default=None,
        help="train one adapter per concept listed in FILE.yaml (sharded over the ranks under torchrun)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    with console_logging():
        if wants_torchrun(args):
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
    if ranks.main:
        print(f"saved LoRA: {path}" + (f" ({ranks.world} ranks)" if ranks.enabled else ""))
    return 0
