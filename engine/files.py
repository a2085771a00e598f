"""Writing files so that a crash or a full disk never leaves a half-written output.

Every output the engine writes (LoRA files, reports, images, logs' summaries, caches) goes through
:func:`write_atomically`: the content is written under a temporary name in the same folder, then
renamed over the target in one step. A reader sees the old file or the new one, never a mix.
Outputs that are folders (checkpoints, generated models) go through :func:`write_folder_atomically`,
the same idea for a folder: the new folder is written beside the old one and swapped in by renames,
so at every moment one complete copy exists under a known name. Files and folders get the mode the
process's umask gives (some writers, safetensors among them, create their files ``0600``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from cat_engine.engine.errors import CatEngineError

# Hidden siblings: ``.NAME.tmp-...`` (being written) and ``.NAME.old-...`` (the previous copy during
# a swap). A process killed mid-write leaves them; their owners clean or recover them on start.
TMP_MARK, OLD_MARK = ".tmp-", ".old-"


class WriteError(CatEngineError):
    """An output that could not be written (full disk, read-only folder...); the message names it."""


# What a failed write raises: OSError from Python, SafetensorError from safetensors (its message
# carries the OS error: "I/O error: No space left on device (os error 28)").
WRITE_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:
    from safetensors import SafetensorError

    WRITE_ERRORS += (SafetensorError,)
except ImportError:  # pragma: no cover
    pass


def os_error_text(exc: BaseException) -> str:
    """The short reason of a failed write (``No space left on device``), without the path it repeats."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r"os error (\d+)", str(exc))
    if found:
        return os.strerror(int(found.group(1)))
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the mode a plain ``open``/``mkdir`` would."""
    mask = umask()
    for root, dirs, files in os.walk(path) if path.is_dir() else [(path.parent, [], [path.name])]:
        for name in dirs:
            os.chmod(Path(root) / name, 0o777 & ~mask)
        for name in files:
            os.chmod(Path(root) / name, 0o666 & ~mask)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on every system; nothing to flush then
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the data is flushed all the same
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the whole content to ``tmp``, then rename ``tmp`` to ``path``.

    ``tmp`` is a hidden sibling of ``path`` (same folder, so the rename is atomic). If ``write``
    raises (a full disk, an encoding error), the temporary file is removed and ``path`` is left as
    it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        apply_umask(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), written by :func:`write_atomically`."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_folder_atomically(
    path: str | os.PathLike, write: Callable[[Path], object], *, replace_existing: bool = True
) -> Path:
    """Call ``write(tmp)`` to fill a new temporary folder, then rename ``tmp`` to ``path``.

    ``tmp`` is a hidden sibling of ``path``. ``replace_existing``: an existing ``path`` is swapped
    out by renames (``path`` to a hidden ``.old`` sibling, ``tmp`` to ``path``) and only then
    removed, so a crash at any point leaves a complete copy (``path``, or the ``.tmp``/``.old``
    sibling while ``path`` is missing); otherwise an existing ``path`` is kept and the new folder
    dropped (a cache that another process filled first). If ``write`` raises, the temporary folder
    is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    try:
        write(tmp)
        apply_umask(tmp)
        if replace_existing and path.exists():
            _swap(tmp, path)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if replace_existing:
                    raise
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path`` in place of the existing one, then remove the old one."""
    old = path.with_name(f".{path.name}{OLD_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)  # the old one back under its name
        raise
    shutil.rmtree(old, ignore_errors=True)
