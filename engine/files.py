"""Writing files so that a crash or a full disk never leaves a half-written output.

Every output the engine writes (LoRA files, reports, images, logs' summaries, caches) goes through
:func:`write_atomically`: the content is written under a temporary name in the same folder, then
renamed over the target in one step. A reader sees the old file or the new one, never a mix.
The temporary file is created with ``open`` (not ``mkstemp``), so it gets the process's umask like
any other file the user's tools create. Outputs that are folders (checkpoints, generated models)
go through :func:`write_folder_atomically`, the same idea for a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the whole content to ``tmp``, then rename ``tmp`` to ``path``.

    ``tmp`` is a hidden sibling of ``path`` (same folder, so the rename is atomic). If ``write``
    raises (a full disk, an encoding error), the temporary file is removed and ``path`` is left as
    it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
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

    ``tmp`` is a hidden sibling of ``path``. ``replace_existing``: an existing ``path`` is removed
    first (a folder cannot be renamed over a non-empty one); otherwise an existing ``path`` is kept
    and the new folder dropped (a cache that another process filled first). If ``write`` raises,
    the temporary folder is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if replace_existing and path.exists():
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace_existing:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
