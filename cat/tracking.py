"""``--log-with tensorboard|wandb|none``: the training curves and sample grids in a tracker.

- ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing to ``OUTPUT/logs`` (optional
  extra ``cat-engine[tensorboard]``); ``tensorboard --logdir OUTPUT/logs`` shows it.
- ``wandb``: a Weights & Biases run in ``OUTPUT`` (optional extra ``cat-engine[wandb]``); online
  when logged in (``WANDB_API_KEY`` or ``wandb login``), else offline (``wandb sync`` uploads it
  later); ``WANDB_MODE`` and ``WANDB_PROJECT`` (default ``cat-engine``) are honoured.

Each step logs ``train/loss``, ``train/ldm``, ``train/cat``, ``train/lr``, ``train/grad_norm``,
``train/it_s`` and ``train/memory_gib`` (the peak allocated GPU memory, or the process's peak
resident memory on a CPU); each sample grid is logged as ``samples``. Rank 0 only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cat_engine.cat.config import ConfigError, TrainConfig

log = logging.getLogger("cat_engine")
LOGS = "logs"
SCALARS = ("loss", "ldm", "cat", "lr", "grad_norm", "it_s", "memory_gib")
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class TrackerUnavailable(ConfigError):
    """``--log-with`` names a tracker whose package is not installed."""

    def __init__(self, name: str):
        super().__init__(
            f"--log-with {name} needs {EXTRAS[name]}, which is not installed: pip install 'cat-engine[{name}]'"
        )


class Tracker:
    """No tracker (``--log-with none``, and every rank but 0): each call does nothing."""

    def log(self, step: int, record: dict) -> None:
        pass

    def log_image(self, step: int, name: str, image) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises it when the tensorboard package is missing
            raise TrackerUnavailable("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, record: dict) -> None:
        for key in SCALARS:
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        self.writer.flush()

    def log_image(self, step: int, name: str, image) -> None:
        import numpy as np

        self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online when an API key is configured, offline otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        logged_in = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        logged_in = False
    return "online" if logged_in else "offline"


class WandbTracker(Tracker):
    def __init__(self, config: TrainConfig, folder: Path):
        try:
            import wandb
        except ImportError:
            raise TrackerUnavailable("wandb") from None
        self.wandb = wandb
        mode = wandb_mode()
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "cat-engine"),
            name=folder.name,
            dir=str(folder),
            config=config.to_dict(),
            mode=mode,
        )
        log.info("W&B run %s (%s)", getattr(self.run, "name", folder.name), mode)

    def log(self, step: int, record: dict) -> None:
        values = {f"train/{k}": record[k] for k in SCALARS if record.get(k) is not None}
        self.run.log(values, step=step)

    def log_image(self, step: int, name: str, image) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_tracker(config: TrainConfig, main: bool = True) -> Tracker:
    """The tracker ``config.log_with`` names (a no-op one on ranks other than 0)."""
    if not main or config.log_with == "none":
        return Tracker()
    output = Path(config.output)
    if config.log_with == "tensorboard":
        return TensorBoardTracker(output / LOGS)
    if config.log_with == "wandb":
        return WandbTracker(config, output)
    raise ConfigError(f"--log-with must be one of none, tensorboard, wandb, got {config.log_with!r}")


def memory_gib(device) -> float | None:
    """Peak memory so far: allocated on a CUDA device, else the process's peak resident set."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import sys

    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
