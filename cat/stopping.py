"""How a training run stops, and the messages that say what it kept (a mixin of
:class:`~cat_engine.cat.train.Trainer`, whose state it reads: ``step``, ``stop``, ``updating``,
``last_checkpoint``...).

- On request (SIGINT, SIGTERM: engine/signals.py), at a step boundary agreed by every rank: a
  checkpoint of the steps completed, then :class:`~cat_engine.engine.signals.Interrupted`.
- On a ``KeyboardInterrupt`` raised inside a step by other means: the step is discarded and the
  steps before it saved, unless the adapter was being updated (then nothing is written).
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from cat_engine.engine import distributed as dist
from cat_engine.engine import signals
from cat_engine.engine.errors import CatEngineError


class TrainingError(CatEngineError):
    """Training stopped for a reason the user must see (non-finite loss...)."""


class NonFiniteAdapter(TrainingError):
    """The adapter or its optimizer state holds NaN or infinite values: it is not saved."""


class Stopping:
    def stop_agreed(self) -> bool:
        """Whether to stop before the next step: this process was asked to, or under torchrun any
        rank was (every rank decides alike, so all write and wait for the same checkpoint)."""
        if not self.ranks.enabled:
            return self.stop.requested
        flag = torch.tensor([float(self.stop.requested)], device=next(iter(self.lora.values())).device)
        return bool(dist.all_mean(self.ranks, flag).item() > 0)

    def interrupted(self) -> signals.Interrupted:
        """Save the steps completed (unless saved already); the exception that says where they are."""
        signum = self.stop.signum or signal.SIGTERM  # a rank that only learned of another's signal
        if self.step == 0:
            kept = "no step had completed, nothing to save"
        else:
            kept = f"checkpoint {self.checkpoint_of_this_step()}; continue with --resume latest"
        return signals.Interrupted(
            signum, f"interrupted by {signals.signal_name(signum)} after step {self.step}: {kept}"
        )

    def interrupted_mid_step(self) -> signals.Interrupted:
        """A ``KeyboardInterrupt`` inside a step: discard the step and save the ones before it, unless
        the adapter was being updated (then its state is half-way, and nothing is written)."""
        if self.updating:
            return signals.Interrupted(
                signal.SIGINT,
                f"interrupted while updating the adapter in step {self.step + 1}: no checkpoint written "
                f"(the adapter may be half-updated); {self.last_good()}",
            )
        self.abandon_step()
        if self.step == 0:
            return signals.Interrupted(
                signal.SIGINT, "interrupted before the first step completed: nothing to save"
            )
        path = self.checkpoint_of_this_step(sync=False)  # a rank may be gone
        return signals.Interrupted(
            signal.SIGINT,
            f"interrupted during step {self.step + 1}: checkpoint {path} of the steps completed; "
            "continue with --resume latest",
        )

    def last_good(self) -> str:
        """The phrase that names the newest checkpoint of this run, for messages."""
        if self.last_checkpoint is None:
            return "no checkpoint written yet"
        return f"last good checkpoint: {self.last_checkpoint}"

    def checkpoint_of_this_step(self, sync: bool = True) -> Path:
        """The checkpoint of the current step: written now unless it already is."""
        if self.saved_step == self.step and self.last_checkpoint is not None:
            return self.last_checkpoint
        return self.save_checkpoint(sync=sync)
