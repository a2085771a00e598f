"""One run per output folder: an exclusive lock while a run uses it, and the identity of the run it holds
(docs/design.md §10).

:func:`claim` is what a run does before any work: the folder must be a folder it can write, no
other process may be using it (:class:`RunLock`, an ``fcntl.flock`` the OS releases when the
holder dies, however it dies), and a folder that already holds a run's outputs is refused unless
the caller continues that run (``resume``: the recorded identity must match) or replaces it
(``overwrite``: the earlier outputs are removed). The identity is a flat dict the caller defines
(data, base, token, seed, rank, ...), recorded in ``OUTPUT/run.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import TMP_MARK, os_error_text, write_text_atomically

try:  # Linux and macOS; elsewhere runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK_FILE = ".cat-engine.lock"
RUN_FILE = "run.json"


class RunFolderError(CatEngineError):
    """An output folder this run may not use; the message names it and what to do."""


class RunLock:
    """An exclusive lock on ``FOLDER/.cat-engine.lock``, held until :meth:`release` or the process ends.

    The file holds the holder's PID and host, so the refusal can name them. The file itself stays
    (removing it would let two processes lock two different files of the same name).
    """

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self.fd = folder, fd

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> RunLock:
        folder = Path(folder)
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise RunFolderError(f"--output {folder}: cannot write there ({os_error_text(exc)})") from None
        if fcntl is None:  # pragma: no cover
            return cls(folder, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"--output {folder} is in use by another cat-engine run ({holder}); "
                "wait for it to finish, or choose another --output"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's name is missing
        return cls(folder, fd)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if not text:
        return "PID unknown"
    return f"PID {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")


def read_identity(folder: str | os.PathLike) -> dict | None:
    """The identity recorded in ``FOLDER/run.json``, or ``None`` (none recorded, or unreadable)."""
    try:
        return json.loads((Path(folder) / RUN_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_identity(folder: str | os.PathLike, identity: dict) -> None:
    write_text_atomically(Path(folder) / RUN_FILE, json.dumps({"identity": identity}, indent=1) + "\n")


def identity_differences(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every key both hold with different values."""
    return [
        f"{k}: {recorded[k]!r} -> {current[k]!r}"
        for k in current
        if k in recorded and recorded[k] != current[k]
    ]


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-*`` files that killed atomic writes left in ``folder``."""
    removed = []
    for p in Path(folder).iterdir():
        if p.name.startswith(".") and TMP_MARK in p.name and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def claim(
    folder: str | os.PathLike,
    identity: dict,
    outputs: tuple[str, ...],
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> RunLock:
    """Lock ``folder`` for this run and check it may hold it; return the lock (release it at the end).

    ``outputs``: the names of the files and folders a run leaves in ``folder``; if one is there,
    the folder holds a run. Then ``resume``: the recorded identity must equal ``identity`` (the
    message names every difference); ``overwrite``: those outputs are removed; neither: refused.
    Raises :class:`RunFolderError`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--output {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"--output {folder}: cannot create it ({os_error_text(exc)})") from None
    lock = RunLock.acquire(folder)
    try:
        _check_outputs(folder, identity, outputs, resume, overwrite)
        remove_stale_temporaries(folder)
        write_identity(folder, identity)
    except OSError as exc:
        lock.release()
        raise RunFolderError(f"--output {folder}: cannot write there ({os_error_text(exc)})") from None
    except BaseException:
        lock.release()
        raise
    return lock


def held_outputs(folder: Path, outputs: tuple[str, ...]) -> list[str]:
    """The names of ``outputs`` present in ``folder`` (an empty file or folder does not count)."""
    found = []
    for name in outputs:
        p = folder / name
        if (p.is_dir() and any(p.iterdir())) or (p.is_file() and p.stat().st_size > 0):
            found.append(name)
    return found


def _check_outputs(folder: Path, identity: dict, outputs, resume: bool, overwrite: bool) -> None:
    held = held_outputs(folder, outputs)
    if not held:
        return
    if overwrite:
        for name in held:
            p = folder / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        return
    if not resume:
        raise RunFolderError(
            f"--output {folder} holds another run ({', '.join(held)}); continue it with --resume latest, "
            "replace it with --overwrite, or choose another --output"
        )
    recorded = read_identity(folder)
    differences = identity_differences(recorded or {}, identity)
    if differences:
        raise RunFolderError(
            f"--resume: the run in {folder} was started with other settings ({'; '.join(differences)}); "
            "use the same settings, or another --output for a new run"
        )
