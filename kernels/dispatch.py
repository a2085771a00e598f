"""Which LoRA path runs for a shape: measured once per device and shape, remembered on disk
(docs/design.md §5).

``CAT_ENGINE_LORA_PATH`` decides first: ``torch`` (the cuBLAS-first path) or ``triton`` for every
call, ``auto`` (or unset) to measure. Under ``auto`` a CPU (or meta) tensor takes the torch path
without timing; on a GPU the first call of a shape times each path (forward and backward, a few
repetitions, CUDA events) and keeps the fastest, in memory and in
``$CAT_ENGINE_CACHE/lora_paths.json`` (default ``~/.cache/cat-engine``), so a second run does
not measure again. The Triton path is kept only when it beats the torch path by more than
:data:`TRITON_MARGIN`: a tie is noise, and the torch path is the simpler one.

No measurement runs where it would disturb what is being done: while ``torch.compile`` traces,
while a CUDA graph is captured, inside a ``TorchDispatchMode`` (counters, the VRAM planner) or
under saved-tensor hooks (memory meters, checkpointing). Such a call takes the choice already
known, else the torch path, and the shape is measured at a later, plain call.

The cache file is a JSON object ``{"format": 1, "entries": {key: {"path", "seconds"}}}``. Writers
re-read it and merge under a lock file, then replace it atomically, so concurrent runs keep each
other's entries and a reader never sees half a file. A file that does not parse is ignored with a
warning (and replaced by the next write), never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

PATH_ENV = "CAT_ENGINE_LORA_PATH"
CACHE_ENV = "CAT_ENGINE_CACHE"
CACHE_FILE = "lora_paths.json"
PATHS = ("torch", "triton")
FORMAT = 1
# The Triton path must be this much faster (relative) to be chosen over the torch path.
TRITON_MARGIN = 0.03
# Timed repetitions of each path (after one untimed warm-up call, which also autotunes Triton).
REPS = 3


def forced_path() -> str | None:
    """The path ``CAT_ENGINE_LORA_PATH`` forces, or None for ``auto``/unset; ``ValueError`` otherwise."""
    value = os.environ.get(PATH_ENV)
    if not value or value == "auto":
        return None
    if value in PATHS:
        return value
    raise ValueError(f"{PATH_ENV}={value!r}: expected auto, torch or triton")


def cache_file() -> Path:
    """``$CAT_ENGINE_CACHE/lora_paths.json``, else under ``~/.cache/cat-engine``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cat-engine"
    return Path(root) / CACHE_FILE


def fastest(seconds: Mapping[str, float]) -> str:
    """The path to keep given each path's time (``inf`` for one that failed): ``torch`` unless
    ``triton`` is faster by more than :data:`TRITON_MARGIN`."""
    torch_s = seconds.get("torch", float("inf"))
    triton_s = seconds.get("triton", float("inf"))
    if triton_s < torch_s * (1.0 - TRITON_MARGIN):
        return "triton"
    return "torch"


def compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def measuring_allowed() -> bool:
    """False inside ``torch.compile`` tracing, CUDA graph capture, a dispatch mode or saved-tensor
    hooks (see the module docstring)."""
    if compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    from torch.utils import _python_dispatch

    if _python_dispatch._get_current_dispatch_mode() is not None:
        return False
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is not None and top_hooks(False) is not None:
        return False
    return True


def time_paths(runs: Mapping[str, Callable[[], object]], reps: int = REPS) -> dict[str, float]:
    """Median CUDA-event seconds of each run, after one untimed call; run round-robin, so drift
    hits every path alike. A run that raises gets ``inf`` and a warning."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - a path that cannot run here is simply not chosen
            warnings.warn(
                f"LoRA path {name} failed while being measured ({type(exc).__name__}: {exc})", stacklevel=3
            )
            seconds[name] = [float("inf")]
    live = [name for name, s in seconds.items() if not s]
    for _ in range(reps):
        for name in live:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runs[name]()
            end.record()
            end.synchronize()
            seconds[name].append(start.elapsed_time(end) / 1e3)
    return {name: sorted(s)[len(s) // 2] for name, s in seconds.items()}


class PathCache:
    """The measured choices of one cache file: key (a string) -> ``{"path", "seconds"}``."""

    def __init__(self, file: Path):
        self.file = Path(file)
        self.entries: dict[str, dict] = {}
        self._loaded = False
        self._warned: set[str] = set()

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, stacklevel=4)

    def _read(self) -> dict[str, dict]:
        """The file's entries; ``{}`` when it is missing, and with a warning when it is broken."""
        try:
            text = self.file.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            self._warn_once("read", f"{self.file}: cannot read the LoRA path cache ({exc}); measuring again")
            return {}
        try:
            data = json.loads(text)
            entries = data["entries"] if data.get("format") == FORMAT else {}
            return {k: v for k, v in entries.items() if isinstance(v, dict) and v.get("path") in PATHS}
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            self._warn_once(
                "broken",
                f"{self.file}: not a valid LoRA path cache ({type(exc).__name__}); ignoring it and measuring again",
            )
            return {}

    def get(self, key: str) -> str | None:
        if not self._loaded:
            self.entries = {**self._read(), **self.entries}
            self._loaded = True
        entry = self.entries.get(key)
        return entry["path"] if entry is not None else None

    def put(self, key: str, path: str, seconds: Mapping[str, float]) -> None:
        """Remember ``path`` for ``key`` here and in the file (merged with what other writers added)."""
        entry = {"path": path, "seconds": {k: (v if v != float("inf") else None) for k, v in seconds.items()}}
        self.entries[key] = entry
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.file.with_name(self.file.name + ".lock")):
                merged = {**self._read(), key: entry}
                _replace_atomically(self.file, json.dumps({"format": FORMAT, "entries": merged}, indent=1))
        except OSError as exc:
            self._warn_once(
                "write", f"{self.file}: cannot write the LoRA path cache ({exc}); keeping it in memory"
            )


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive lock on ``lock_path`` (POSIX ``flock``; none where it does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic replace alone (a concurrent entry may be lost)
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace_atomically(path: Path, text: str) -> None:
    # kernels/ sits below engine/files.py (the dependency rule), hence this small copy of it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Dispatcher:
    """Chooses a path per shape key: memory first, then the cache file, then a measurement."""

    def __init__(self, cache: PathCache | None = None):
        self._cache = cache
        self.memory: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @property
    def cache(self) -> PathCache:
        if self._cache is None:
            self._cache = PathCache(cache_file())
        return self._cache

    def choose(self, key: tuple, describe: Callable[[], str], measure: Callable[[], dict[str, float]]) -> str:
        """The path for ``key`` (a hashable tuple). ``describe()`` gives its key in the file (device
        name, versions, shapes); ``measure()`` times each path. Not allowed to measure now: the
        torch path, nothing remembered."""
        known = self.memory.get(key)
        if known is not None:
            return known
        if not measuring_allowed():
            return "torch"
        with self._lock:
            text = describe()
            path = self.cache.get(text)
            if path is None:
                seconds = measure()
                path = fastest(seconds)
                self.cache.put(text, path, seconds)
            self.memory[key] = path
        return path


DISPATCHER = Dispatcher()
