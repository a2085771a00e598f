"""Helpers of the fault-injection suite (fixtures in conftest.py): the tiny model, the command line
in-process, a disk that can be filled up.

A full disk is a real small tmpfs where this machine lets the test mount one (root, ``mount -t
tmpfs`` works), else an ``OSError(ENOSPC)`` injected into the engine's write paths (safetensors'
``save_file`` and Python's ``open``) for files under the disk's folder. Either way the engine sees the
error a full disk gives, from the call that would write.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

from cat_engine.cli import main
from cat_engine.engine.run_folder import LOCK_FILE


def tiny_base() -> str:
    from cat_engine.engine.builtin import builtin_model_dir

    return str(builtin_model_dir(pretrained=False))


def train_argv(output, *extra) -> list[str]:
    """``cat-engine train`` on the tiny model with few, fast steps (``extra`` overrides)."""
    return [
        *("train", "--base", tiny_base(), "--rank", "4", "--batch-size", "1", "--lr", "1e-3"),
        *("--steps", "4", "--save-every", "2", "--keep-checkpoints", "10", "--device", "cpu"),
        *("--output", str(output), *extra),
    ]


def run_cli(capsys, argv) -> tuple[int, list[str]]:
    """``cat-engine ARGV`` in this process: its exit code and the lines it wrote to stderr (progress bars
    aside)."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.replace("\r", "\n")
    return code, [line for line in err.splitlines() if line.startswith("cat-engine")]


def one_error(lines: list[str]) -> str:
    """The one error line of a failed command (and no traceback)."""
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: what must survive a failure unchanged."""
    files = [
        p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE
    ]  # the lock: not state
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def can_mount_tmpfs(where: Path, options: str) -> bool:
    # CAT_ENGINE_TEST_NO_MOUNT=1 runs the injected variant where a tmpfs would be possible.
    if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("CAT_ENGINE_TEST_NO_MOUNT"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Disk:
    """A folder whose file system can be filled up (:meth:`fill`) and emptied again (:meth:`free`)."""

    def __init__(self, root: Path, real: bool, monkeypatch):
        self.root, self.real, self.full = root, real, False
        if not real:
            self._inject(monkeypatch)

    def fill(self) -> None:
        self.full = True
        if self.real:  # write until the file system refuses, in ever smaller pieces
            fd = os.open(self.root / ".filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                for size in (1 << 20, 1 << 16, 1 << 12, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
            finally:
                os.close(fd)

    def free(self) -> None:
        self.full = False
        (self.root / ".filler").unlink(missing_ok=True)

    def _under(self, path) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(self.root.resolve())
        except TypeError:  # a file descriptor
            return False

    def _refuse(self, path, *args):
        if self.full and self._under(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def _inject(self, monkeypatch) -> None:
        import safetensors.torch
        from safetensors import SafetensorError

        real_save, real_open = safetensors.torch.save_file, builtins.open
        disk = self

        def save_file(tensors, filename, metadata=None):
            if disk.full and disk._under(filename):
                with real_open(filename, "wb") as f:  # as a full disk does: a part, then the error
                    f.write(b"\0" * 16)
                # what safetensors raises when the disk is full (not an OSError)
                raise SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)"
                )
            return real_save(tensors, filename, metadata=metadata)

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax") and disk._under(file):
                return _Refusing(handle, disk, file)
            return handle

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)


class _Refusing:
    """A file object whose writes fail while its disk is full."""

    def __init__(self, handle, disk: Disk, name):
        self._handle, self._disk, self._name = handle, disk, name

    def write(self, data):
        self._disk._refuse(self._name)
        return self._handle.write(data)

    def flush(self):
        self._disk._refuse(self._name)
        return self._handle.flush()

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()
