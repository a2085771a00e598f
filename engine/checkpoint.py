"""Training checkpoints: ``OUTPUT/checkpoints/step-N/``, safetensors and JSON only (no pickle).

A checkpoint holds everything needed to continue bit-exactly: the LoRA weights, the optimizer
state, the learning-rate schedule, the RNG states, the data position and the config. It is
written into a temporary folder and renamed into place (``engine/files.py``), so a crash
mid-write never leaves a half checkpoint under a ``step-N`` name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import write_folder_atomically

# File and key names: constants, so save and load cannot disagree.
LORA_FILE = "lora.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
STEP_PATTERN = re.compile(r"^step-(\d+)$")
CHECKPOINTS = "checkpoints"


class CheckpointError(CatEngineError):
    """A checkpoint that cannot be used; the message names the folder and the problem."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# Nested per-parameter state (bitsandbytes keeps its 8-bit buffers in a dict under one key) is
# flattened into the key path: "3.outer/inner", where 3 is the parameter's index.
_NESTED = "/"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Split ``optimizer.state_dict()`` into JSON (groups, scalars) and tensors (safetensors).

    Every entry must be a tensor or a JSON value (nested dicts of them too): anything else would
    not come back as it was, so it is refused rather than written as its ``str``.
    """
    state = optimizer.state_dict()
    tensors, scalars = {}, {}

    def put(path: str, value) -> None:
        if torch.is_tensor(value):
            tensors[path] = value
        elif isinstance(value, dict):
            for key, inner in value.items():
                put(f"{path}{_NESTED}{key}", inner)
        else:
            scalars[path] = _json_value(path, value)

    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            put(f"{index}.{key}", value)
    groups = [{k: _json_value(f"param_groups.{k}", v) for k, v in g.items()} for g in state["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def _json_value(where: str, value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(where, v) for v in value]
    raise CheckpointError(
        f"optimizer state {where}: a {type(value).__name__} cannot be stored in a checkpoint (JSON or tensors)"
    )


def optimizer_from_files(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        *outer, last = key.split(_NESTED)
        entry = state.setdefault(int(index), {})
        for name in outer:
            entry = entry.setdefault(name, {})
        entry[last] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states(generator: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"noise_generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    return states


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    generator.set_state(states["noise_generator"])
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    lora: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    trainer_state: dict,
    keep: int | None = None,
    extra: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``OUTPUT/checkpoints/step-{step}`` atomically; prune to the newest ``keep``.

    ``extra(folder)`` writes further files into the checkpoint before it is complete (the loadable
    LoRA files of the run's ``--save-format``).
    """

    def write(folder: Path) -> None:
        if extra is not None:
            extra(folder)
        _save_tensors(lora, folder / LORA_FILE)
        opt_meta, opt_tensors = optimizer_to_files(optimizer)
        _save_tensors(opt_tensors, folder / OPTIMIZER_TENSORS)
        _save_tensors(rng_states(generator), folder / RNG_FILE)
        state = {**trainer_state, "step": step, "optimizer": opt_meta}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True, default=str))

    # re-saving the same step (e.g. Ctrl-C right after a save) replaces it
    target = write_folder_atomically(Path(output_dir) / CHECKPOINTS / f"step-{step}", write)
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``OUTPUT/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_PATTERN.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path:
    """``latest`` → the newest complete checkpoint of ``output_dir``; else the given folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(
                f"--resume latest: no checkpoint in {Path(output_dir) / CHECKPOINTS}; start without --resume"
            )
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {path}: not a cat-engine checkpoint folder (no {STATE_FILE})")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint: ``{"lora", "optimizer", "rng", "state"}`` (tensors on the CPU)."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        return {
            "lora": _load_tensors(path / LORA_FILE),
            "optimizer": optimizer_from_files(
                state.pop("optimizer"), _load_tensors(path / OPTIMIZER_TENSORS)
            ),
            "rng": _load_tensors(path / RNG_FILE),
            "state": state,
        }
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable ({exc})") from None
