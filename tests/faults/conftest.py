"""Fixtures of the fault-injection suite: a disk to fill (faultkit.Disk), a read-only folder."""

from __future__ import annotations

import os

import pytest
from faultkit import Disk, can_mount_tmpfs, unmount


@pytest.fixture
def disk(tmp_path, monkeypatch):
    """A 64 MB disk to fill: a real tmpfs where the machine allows, else injected ENOSPC."""
    root = tmp_path / "disk"
    real = can_mount_tmpfs(root, "size=64m")
    root.mkdir(exist_ok=True)
    try:
        yield Disk(root, real, monkeypatch)
    finally:
        if real:
            unmount(root)


@pytest.fixture
def injected_disk(tmp_path, monkeypatch):
    """A disk whose fullness is always injected: a tmpfs fills by pages, and small appends to a file
    (the log) would go on into its last page's free space after the disk is full."""
    root = tmp_path / "disk"
    root.mkdir()
    return Disk(root, False, monkeypatch)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write into (a read-only tmpfs as root, a 0555 folder otherwise)."""
    root = tmp_path / "ro"
    if os.geteuid() != 0:
        root.mkdir()
        root.chmod(0o555)
        yield root
        root.chmod(0o755)
        return
    if not can_mount_tmpfs(root, "ro,size=1m"):
        pytest.skip("running as root without mount: no folder is read-only to this process")
    try:
        yield root
    finally:
        unmount(root)
