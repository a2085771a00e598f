"""engine/files.py: a file or folder is either the old one or the whole new one, never half written."""

from __future__ import annotations

import os
import stat

import pytest

from cat_engine.engine import files
from cat_engine.engine.files import write_atomically, write_folder_atomically, write_text_atomically


def _names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_write_atomically_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "report.json"
    assert write_text_atomically(target, "old") == target
    write_text_atomically(target, "new")
    assert target.read_text() == "new" and _names(target.parent) == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = write_text_atomically(tmp_path / "report.json", "old")

    def half_then_fail(tmp):
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old" and _names(tmp_path) == ["report.json"]


def _fill(text):
    def write(folder):
        (folder / "a.txt").write_text(text)
        (folder / "b.txt").write_text(text)

    return write


def test_write_folder_atomically_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "checkpoints" / "step-2"
    write_folder_atomically(target, _fill("old"))
    (target / "stale.txt").write_text("from the old folder")
    assert write_folder_atomically(target, _fill("new")) == target
    assert _names(target) == ["a.txt", "b.txt"] and (target / "a.txt").read_text() == "new"
    assert _names(target.parent) == ["step-2"]


def test_write_folder_atomically_can_keep_what_another_process_wrote(tmp_path):
    target = write_folder_atomically(tmp_path / "model", _fill("theirs"))
    write_folder_atomically(target, _fill("ours"), replace_existing=False)
    assert (target / "a.txt").read_text() == "theirs" and _names(tmp_path) == ["model"]


@pytest.mark.parametrize("replace_existing", [True, False])
def test_a_failed_folder_write_leaves_the_old_folder(tmp_path, replace_existing):
    target = write_folder_atomically(tmp_path / "model", _fill("old"))

    def half_then_fail(folder):
        (folder / "a.txt").write_text("new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_folder_atomically(target, half_then_fail, replace_existing=replace_existing)
    assert (target / "a.txt").read_text() == "old" and _names(tmp_path) == ["model"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = write_folder_atomically(tmp_path / "model", _fill("old"))
    real = files.os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder into place
            raise OSError("rename refused")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="rename refused"):
        write_folder_atomically(target, _fill("new"))
    monkeypatch.undo()
    assert (target / "a.txt").read_text() == "old" and _names(tmp_path) == ["model"]


def test_written_files_get_the_umask_whatever_the_writer_does(tmp_path):
    old = os.umask(0o027)
    try:
        # safetensors, like mkstemp, creates its files 0600
        write_atomically(
            tmp_path / "f.bin", lambda tmp: os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
        )
        write_folder_atomically(tmp_path / "d", _fill("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "d" / "a.txt").stat().st_mode) == 0o640
