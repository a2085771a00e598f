"""engine/run_folder.py: one run per output folder (lock, identity, refusals)."""

from __future__ import annotations

import os

import pytest

from cat_engine.engine import run_folder as rf

OUTPUTS = ("checkpoints", "lora.safetensors", "log.jsonl")
IDENTITY = {"seed": 0, "rank": 4, "data": "/photos"}


def _in_child(fn):
    """Run ``fn`` in a forked child; its exit status (0 when it returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1]


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    lock = rf.claim(tmp_path / "out", IDENTITY, OUTPUTS)
    read, write = os.pipe()

    def try_it():
        try:
            rf.claim(tmp_path / "out", IDENTITY, OUTPUTS)
        except rf.RunFolderError as exc:
            os.write(write, str(exc).encode())
            raise

    assert _in_child(try_it) != 0
    os.close(write)
    message = os.read(read, 4096).decode()
    assert f"in use by another cat-engine run (PID {os.getpid()}" in message
    lock.release()
    assert _in_child(lambda: rf.claim(tmp_path / "out", IDENTITY, OUTPUTS)) == 0  # free again


def test_the_lock_goes_when_its_holder_dies(tmp_path):
    assert _in_child(lambda: (rf.RunLock.acquire(tmp_path), os.kill(os.getpid(), 9))) != 0
    rf.RunLock.acquire(tmp_path).release()


def test_a_folder_with_a_run_is_refused_unless_resumed_with_the_same_identity_or_overwritten(tmp_path):
    out = tmp_path / "out"
    rf.claim(out, IDENTITY, OUTPUTS).release()
    (out / "lora.safetensors").write_bytes(b"weights of run 1")
    with pytest.raises(
        rf.RunFolderError, match=r"holds another run \(lora\.safetensors\).*--resume latest.*--overwrite"
    ):
        rf.claim(out, IDENTITY, OUTPUTS)
    assert (out / "lora.safetensors").read_bytes() == b"weights of run 1"
    with pytest.raises(rf.RunFolderError, match=r"other settings \(seed: 0 -> 1; rank: 4 -> 8\)"):
        rf.claim(out, {**IDENTITY, "seed": 1, "rank": 8}, OUTPUTS, resume=True)
    rf.claim(out, IDENTITY, OUTPUTS, resume=True).release()
    rf.claim(out, {**IDENTITY, "seed": 1}, OUTPUTS, overwrite=True).release()
    assert not (out / "lora.safetensors").exists() and rf.read_identity(out)["seed"] == 1


def test_an_output_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(rf.RunFolderError, match="is a file, not a folder"):
        rf.claim(tmp_path / "out", IDENTITY, OUTPUTS)


def test_stale_temporary_files_of_killed_writes_are_removed(tmp_path):
    (tmp_path / ".lora.safetensors.tmp-123").write_bytes(b"half")
    (tmp_path / "keep.txt").write_text("the user's")
    rf.claim(tmp_path, IDENTITY, OUTPUTS).release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [rf.LOCK_FILE, "keep.txt", rf.RUN_FILE]
