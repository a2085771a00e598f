"""The training run's output folder, made safe before any work starts (docs/design.md §10).

:func:`prepare_output` runs first in :meth:`~cat_engine.cat.train.Trainer.setup`, on rank 0 (which
writes every output), and hands its verdict to the other ranks:

- the folder is locked for this run and must not hold another one (``engine/run_folder.py``):
  ``--resume`` continues the run it holds (same identity, :data:`~cat_engine.cat.config.IDENTITY`),
  ``--overwrite`` replaces it, anything else is refused;
- what killed saves left in ``checkpoints/`` is finished or removed (``engine/checkpoint.py``);
- the checkpoint to resume from is found (``latest``: the newest that verifies) and checked against
  this run: same identity, and ``--steps`` beyond its step;
- checkpoints newer than it (a continuation being replaced) are renamed out of ``--resume latest``'s
  way, and the log is cut back to its step, so the folder reads as one straight run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cat_engine.cat.config import ConfigError, TrainConfig, run_identity
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine import distributed as dist
from cat_engine.engine.files import WriteError, os_error_text, write_text_atomically
from cat_engine.engine.kohya import kohya_file_name
from cat_engine.engine.lora import LORA_WEIGHT_NAME
from cat_engine.engine.run_folder import RunFolderError, RunLock, claim, identity_differences

log = logging.getLogger("cat_engine")
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
# The recipe's keys in a checkpoint's trainer state (engine/checkpoint.py adds STEP_KEY itself).
CONFIG_KEY = "config"
STEP_KEY = "step"
# What a run leaves in its folder (and its kohya LoRA file); one of them there: the folder holds a run.
RUN_OUTPUTS = (ckpt.CHECKPOINTS, LORA_WEIGHT_NAME, LOG_FILE)
SUPERSEDED = ".superseded"


def prepare_output(config: TrainConfig, ranks: dist.DistContext) -> tuple[RunLock | None, Path | None]:
    """Rank 0's lock on ``config.output`` (``None`` on the other ranks) and, on every rank, the
    checkpoint to resume from (``None`` without ``--resume``). Raises rank 0's error on every rank."""
    lock = resume = error = None
    if ranks.main:
        try:
            lock, resume = _prepare(config)
        except Exception as exc:  # every rank must learn of it, or the others wait forever
            error = exc
    verdict = dist.broadcast_object(ranks, (None if resume is None else str(resume), error))
    if verdict[1] is not None:
        raise verdict[1] if error is None else error
    return lock, None if verdict[0] is None else Path(verdict[0])


def _prepare(config: TrainConfig) -> tuple[RunLock, Path | None]:
    output = Path(config.output)
    identity = run_identity(config.to_dict())
    outputs = (*RUN_OUTPUTS, kohya_file_name(output))  # --save-format kohya or both
    lock = claim(output, identity, outputs, resume=bool(config.resume), overwrite=config.overwrite)
    try:
        for line in ckpt.tidy_checkpoints(output):
            log.warning("%s", line)
        if not config.resume:
            return lock, None
        path = ckpt.resolve_resume(config.resume, output)
        step = check_resume_point(config, path)
        supersede_newer(output, path, step)
        trim_log(output / LOG_FILE, step)
    except BaseException:
        lock.release()
        raise
    return lock, path


def check_resume_point(config: TrainConfig, path: Path) -> int:
    """The step of the checkpoint at ``path``, after checking this run may continue it."""
    state = ckpt.read_state(path)
    saved = state.get(CONFIG_KEY) or {}
    differences = identity_differences(run_identity(saved), run_identity(config.to_dict()))
    if differences:
        raise RunFolderError(
            f"--resume {path}: the checkpoint was trained with other settings ({'; '.join(differences)}); "
            "use the same settings, or start a new run without --resume"
        )
    step = int(state[STEP_KEY])
    if config.steps < step:
        raise ConfigError(
            f"--steps {config.steps} is below the step of the checkpoint to resume ({path}: step {step}); "
            f"a resumed run continues from there: give --steps above {step}"
        )
    if config.steps == step:
        log.warning(
            "--resume %s is at step %d, which is --steps: nothing left to train; writing its LoRA", path, step
        )
    return step


def supersede_newer(output: Path, resumed: Path, step: int) -> None:
    """Rename the checkpoints of ``output`` newer than the resumed one to ``step-N.superseded``:
    this run replaces the continuation they belong to, and ``--resume latest`` must not take them."""
    if resumed.resolve().parent != (output / ckpt.CHECKPOINTS).resolve():
        return
    for newer in [p for p in ckpt.list_checkpoints(output) if ckpt.step_of(p) > step]:
        target, n = newer.with_name(newer.name + SUPERSEDED), 1
        while target.exists():
            target, n = newer.with_name(f"{newer.name}{SUPERSEDED}-{n}"), n + 1
        os.replace(newer, target)
        log.warning(
            "resuming from %s: the newer %s belongs to the continuation this run replaces; kept as %s",
            *(resumed.name, newer.name, target.name),
        )


def trim_log(path: Path, step: int) -> None:
    """Drop the log records after ``step`` (steps a killed run did past its last checkpoint) and any
    line cut short by the kill, so the resumed run's records follow on without a repeat."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if (s := _record_step(line)) is not None and s <= step]
    kept = [line if line.endswith("\n") else line + "\n" for line in kept]
    if kept != lines:
        write_text_atomically(path, "".join(kept))


def _record_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class TrainLog:
    """``train_log.jsonl``, one JSON record a line, flushed after each; a write the disk refuses is
    a :class:`WriteError` naming the file. Only the writing rank opens it (``enabled``)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled, self.file = path, enabled, None

    def __enter__(self) -> TrainLog:
        if self.enabled:
            try:
                self.file = open(self.path, "a", encoding="utf-8")
            except OSError as exc:
                raise WriteError(f"{self.path}: cannot write it ({os_error_text(exc)})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # the failed write already said why
                pass

    def write(self, record: dict, last_good=lambda: "") -> None:
        """Append ``record``; ``last_good()`` completes the message of a failed write."""
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:
            raise WriteError(
                f"{self.path}: cannot write it ({os_error_text(exc)}) after step {record.get(STEP_KEY)}; {last_good()}"
            ) from None
