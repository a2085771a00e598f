"""Training checkpoints: ``OUTPUT/checkpoints/step-N/``, safetensors and JSON only (no pickle; docs/design.md §10).

A checkpoint holds everything needed to continue bit-exactly: the LoRA weights, the optimizer
state, the learning-rate schedule, the RNG states, the data position and the config. What makes it
safe to rely on:

- it is written into a hidden temporary folder and renamed into place; a new ``step-N`` replaces
  an old one by a swap of renames, never by delete-then-write (``engine/files.py``);
- ``manifest.json``, written last, lists every file with its size and SHA-256: a checkpoint is
  complete only when every file matches it, so a truncated or garbled file is detected;
- it is never written with a non-finite tensor: the save refuses (:class:`NonFiniteState`);
- :func:`tidy_checkpoints` (run at start, under the run lock) finishes what a killed save left:
  a complete hidden copy of a missing ``step-N`` is renamed back, every other leftover removed;
- ``--resume latest`` (:func:`resolve_resume`) takes the newest checkpoint that verifies and
  loads, and names each newer one it skips.

Extra files: ``save_checkpoint(..., extra=write)`` lets ``write(folder)`` add files (the run's
loadable LoRA files); the manifest covers them, and :func:`load_checkpoint` returns the tensors of
every other ``.safetensors`` file under ``"extra"``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import (
    OLD_MARK,
    TMP_MARK,
    WRITE_ERRORS,
    fsync_path,
    os_error_text,
    write_folder_atomically,
)

log = logging.getLogger(__name__)

# File and key names: constants, so save and load cannot disagree.
LORA_FILE = "lora.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"  # written last: the size and hash of every other file
MANIFEST_FORMAT = 1
STEP_PATTERN = re.compile(r"^step-(\d+)$")
# What a killed save or prune leaves beside the checkpoints (engine/files.py's hidden siblings).
LEFTOVER_PATTERN = re.compile(rf"^\.step-(\d+)({re.escape(TMP_MARK)}|{re.escape(OLD_MARK)}|\.pruned-)")
CHECKPOINTS = "checkpoints"


class CheckpointError(CatEngineError):
    """A checkpoint that cannot be used or written; the message names the folder and the problem."""


class NonFiniteState(CheckpointError):
    """The state to save holds NaN or infinite values: saving it would poison the last good checkpoint."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    fsync_path(path)


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


def first_non_finite(files: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """``"file: tensor"`` of the first floating tensor with a NaN or an infinity, else ``None``."""
    for file, tensors in files.items():
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{file}: {name}"
    return None


# ---------------------------------------------------------------------------------------- save
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
    """Write ``OUTPUT/checkpoints/step-{step}`` atomically; then prune older ones to the newest ``keep``.

    ``extra(folder)`` writes further files into the checkpoint before it is complete (the loadable
    LoRA files of the run's ``--save-format``); the manifest covers them like the rest. Raises
    :class:`NonFiniteState` (nothing written) when a LoRA or optimizer tensor is not finite, and
    :class:`CheckpointError` naming the folder when the disk refuses the write (the checkpoints
    already there are untouched).
    """
    opt_meta, opt_tensors = optimizer_to_files(optimizer)
    tensor_files = {LORA_FILE: lora, OPTIMIZER_TENSORS: opt_tensors}
    bad = first_non_finite(tensor_files)
    target = Path(output_dir) / CHECKPOINTS / f"step-{step}"
    if bad:
        raise NonFiniteState(f"checkpoint {target}: not written, {bad} holds NaN or infinite values")

    def write(folder: Path) -> None:
        if extra is not None:
            extra(folder)
        for name, tensors in tensor_files.items():
            _save_tensors(tensors, folder / name)
        _save_tensors(rng_states(generator), folder / RNG_FILE)
        state = {**trainer_state, "step": step, "optimizer": opt_meta}
        _write_json(folder / STATE_FILE, state)
        _write_json(folder / MANIFEST_FILE, manifest_of(folder))  # last: it marks the folder complete

    try:
        write_folder_atomically(target, write)
    except WRITE_ERRORS as exc:
        raise CheckpointError(f"checkpoint {target}: cannot write it ({os_error_text(exc)})") from None
    if keep:
        prune_checkpoints(output_dir, keep, step)
    return target


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=str))
    fsync_path(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_of(folder: Path) -> dict:
    """Every file of ``folder`` (but the manifest) with its size in bytes and SHA-256."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    return {
        "format": MANIFEST_FORMAT,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }


def prune_checkpoints(output_dir: str | os.PathLike, keep: int, newest: int) -> None:
    """Remove the checkpoints older than ``step-{newest}`` but the ``keep - 1`` newest of them.

    Each is first renamed to a hidden ``.pruned`` name, so a kill mid-removal never leaves a
    half-deleted ``step-N``; checkpoints newer than ``newest`` are not touched.
    """
    older = [p for p in list_checkpoints(output_dir) if step_of(p) < newest]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        doomed = old.with_name(f".{old.name}.pruned-{os.getpid()}")
        try:
            os.replace(old, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)


# ------------------------------------------------------------------------------------- find
def step_of(path: Path) -> int:
    return int(STEP_PATTERN.match(path.name).group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints under ``OUTPUT/checkpoints`` that look complete (a manifest, or the state file of
    a checkpoint written before manifests), oldest first. :func:`verify_checkpoint` checks them."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_PATTERN.match(p.name)
        if m and p.is_dir() and ((p / MANIFEST_FILE).is_file() or (p / STATE_FILE).is_file()):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """The problem that makes the checkpoint at ``path`` unusable, or ``None`` when it is complete.

    Complete: every file the manifest lists is there with its size and hash. A checkpoint written
    before manifests (state file, no manifest) passes when its state file is there.
    """
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        return None if (path / STATE_FILE).is_file() else f"incomplete (no {MANIFEST_FILE})"
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
        for name in (LORA_FILE, OPTIMIZER_TENSORS, RNG_FILE, STATE_FILE):
            if name not in files:
                return f"{MANIFEST_FILE} does not list {name}"
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
            if _sha256(file) != expected["sha256"]:
                return f"{name} does not match its hash in {MANIFEST_FILE} (corrupt)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST_FILE} unreadable ({type(exc).__name__}: {exc})"
    return None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path:
    """``latest`` → the newest checkpoint of ``output_dir`` that verifies and loads (each newer one
    skipped with a warning that says why); else the given folder, which must verify and load."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / MANIFEST_FILE).is_file() and not (path / STATE_FILE).is_file():
            raise CheckpointError(f"--resume {path}: not a cat-engine checkpoint folder (no {MANIFEST_FILE})")
        load_checkpoint(path)  # raises with the problem
        return path
    found = list_checkpoints(output_dir)
    for path in reversed(found):
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("--resume latest: skipping %s", exc)
            continue
        return path
    root = Path(output_dir) / CHECKPOINTS
    if found:
        raise CheckpointError(
            f"--resume latest: none of the {len(found)} checkpoints in {root} is usable; start without --resume"
        )
    raise CheckpointError(f"--resume latest: no checkpoint in {root}; start without --resume")


def read_state(path: str | os.PathLike) -> dict:
    """The trainer state (JSON) of the checkpoint at ``path``, without its tensors."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} unreadable ({exc})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint: ``{"lora", "optimizer", "rng", "state", "extra"}`` (CPU tensors).

    Raises :class:`CheckpointError` naming the folder when it is incomplete, corrupt or holds
    non-finite values.
    """
    from safetensors import SafetensorError

    path = Path(path)
    problem = verify_checkpoint(path)
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    known = {LORA_FILE, OPTIMIZER_TENSORS, RNG_FILE}
    try:
        state = json.loads((path / STATE_FILE).read_text())
        tensors = {p.name: _load_tensors(p) for p in sorted(path.glob("*.safetensors"))}
        loaded = {
            "lora": tensors[LORA_FILE],
            "optimizer": optimizer_from_files(state.pop("optimizer"), tensors[OPTIMIZER_TENSORS]),
            "rng": tensors[RNG_FILE],
            "state": state,
            "extra": {k: v for k, v in tensors.items() if k not in known},
        }
    except (OSError, KeyError, ValueError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from None
    bad = first_non_finite({LORA_FILE: loaded["lora"], OPTIMIZER_TENSORS: tensors[OPTIMIZER_TENSORS]})
    if bad:
        raise CheckpointError(f"checkpoint {path}: {bad} holds NaN or infinite values")
    return loaded


# ------------------------------------------------------------------------------------ tidy
def tidy_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Finish what killed saves and prunes left in ``OUTPUT/checkpoints``; what was done, one line each.

    A hidden ``.step-N.tmp-*`` or ``.step-N.old-*`` copy that verifies, where ``step-N`` is missing
    (a kill between the two renames of a swap), is renamed back to ``step-N``; every other hidden
    leftover is removed. Call it only while holding the run lock (no save of another process runs).
    """
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = []
    leftovers = sorted(
        (p for p in root.iterdir() if LEFTOVER_PATTERN.match(p.name)),
        key=lambda p: (TMP_MARK not in p.name, p.name),  # a complete new copy before the old one
    )
    for p in leftovers:
        target = root / f"step-{LEFTOVER_PATTERN.match(p.name).group(1)}"
        restorable = ".pruned-" not in p.name and p.is_dir() and (p / MANIFEST_FILE).is_file()
        if restorable and not target.exists() and verify_checkpoint(p) is None:
            os.replace(p, target)
            done.append(f"restored {target} from an interrupted save ({p.name})")
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p} (left by an interrupted save)")
    return done
