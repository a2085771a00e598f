import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from cat_engine.engine import checkpoint as ckpt


def _setup():
    torch.manual_seed(0)
    params = {
        "a.lora_A.weight": torch.nn.Parameter(torch.randn(3, 5)),
        "a.lora_B.weight": torch.nn.Parameter(torch.randn(5, 3)),
    }
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum((p**2).sum() for p in params.values()).backward()
        opt.step()
    return params, opt


def test_roundtrip_restores_optimizer_and_rng(tmp_path):
    params, opt = _setup()
    gen = torch.Generator().manual_seed(5)
    gen_state = gen.get_state().clone()
    path = ckpt.save_checkpoint(tmp_path, 2, params, opt, gen, {"data_position": 2})
    assert path.name == "step-2" and not list((tmp_path / "checkpoints").glob(".step-*"))
    loaded = ckpt.load_checkpoint(path)
    for k, v in params.items():
        torch.testing.assert_close(loaded["lora"][k], v.detach())
    params2, opt2 = _setup()
    opt2.load_state_dict(loaded["optimizer"])
    for (_i, s1), (_, s2) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        for key in s1:
            torch.testing.assert_close(torch.as_tensor(s1[key]), torch.as_tensor(s2[key]))
    g2 = torch.Generator()
    ckpt.restore_rng(loaded["rng"], g2)
    assert torch.equal(g2.get_state(), gen_state)
    assert loaded["state"]["step"] == 2 and loaded["state"]["data_position"] == 2


def test_no_pickle_in_checkpoint(tmp_path):
    params, opt = _setup()
    path = ckpt.save_checkpoint(tmp_path, 1, params, opt, torch.Generator(), {})
    names = sorted(p.name for p in path.iterdir())
    files = [ckpt.LORA_FILE, ckpt.OPTIMIZER_TENSORS, ckpt.RNG_FILE, ckpt.STATE_FILE, ckpt.MANIFEST_FILE]
    assert names == sorted(files)
    json.loads((path / ckpt.MANIFEST_FILE).read_text())
    json.loads((path / ckpt.STATE_FILE).read_text())


def test_latest_and_pruning(tmp_path):
    params, opt = _setup()
    for step in (1, 2, 3, 10):
        ckpt.save_checkpoint(tmp_path, step, params, opt, torch.Generator(), {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-3", "step-10"]  # numeric, not lexical
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-10"
    # an interrupted write (temporary folder, or a folder without the state file) is never "latest"
    (tmp_path / "checkpoints" / "step-11").mkdir()
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-10"


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.resolve_resume("latest", tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not a cat-engine checkpoint"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)


# --------------------------------------------------------------------- safety of the checkpoints
def _save(tmp_path, step, params=None, keep=None, **kw):
    params_opt = _setup() if params is None else params
    return ckpt.save_checkpoint(
        tmp_path, step, params_opt[0], params_opt[1], torch.Generator(), {}, keep=keep, **kw
    )


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _corrupt(path, how):
    if how == "truncated":
        data = (path / ckpt.LORA_FILE).read_bytes()
        (path / ckpt.LORA_FILE).write_bytes(data[: len(data) // 2])
    elif how == "garbled header":
        data = bytearray((path / ckpt.OPTIMIZER_TENSORS).read_bytes())
        data[8:40] = b"x" * 32
        (path / ckpt.OPTIMIZER_TENSORS).write_bytes(bytes(data))
    elif how == "zero bytes":
        (path / ckpt.RNG_FILE).write_bytes(b"")
    elif how == "no manifest":
        (path / ckpt.MANIFEST_FILE).unlink()
        (path / ckpt.STATE_FILE).unlink()
    elif how == "missing file":
        (path / ckpt.OPTIMIZER_TENSORS).unlink()
    elif how == "nan tensors":  # consistent sizes and hashes (a checkpoint that was saved poisoned)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / ckpt.LORA_FILE))
        save_file({k: v * float("nan") for k, v in tensors.items()}, str(path / ckpt.LORA_FILE))
        (path / ckpt.MANIFEST_FILE).write_text(json.dumps(ckpt.manifest_of(path)))


CORRUPTIONS = ["truncated", "garbled header", "zero bytes", "no manifest", "missing file", "nan tensors"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_latest_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, how, caplog):
    for step in (1, 2):
        _save(tmp_path, step)
    _corrupt(tmp_path / "checkpoints" / "step-2", how)
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest", tmp_path).name == "step-1"
    assert ("skipping" in caplog.text and "step-2" in caplog.text) or how == "no manifest"
    with pytest.raises(ckpt.CheckpointError, match="step-2"):
        ckpt.resolve_resume(str(tmp_path / "checkpoints" / "step-2"), tmp_path)


def test_a_checkpoint_is_never_saved_with_non_finite_values(tmp_path):
    params, opt = _setup()
    first = _save(tmp_path, 1, (params, opt))
    before = _bytes(first)
    with torch.no_grad():
        params["a.lora_A.weight"][0, 0] = float("inf")
    with pytest.raises(ckpt.NonFiniteState, match=r"lora\.safetensors: a\.lora_A\.weight"):
        _save(tmp_path, 2, (params, opt))
    with pytest.raises(ckpt.NonFiniteState):  # the same step: the good one stays as it was
        _save(tmp_path, 1, (params, opt))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-1"] and _bytes(first) == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_resaving_a_step_swaps_the_new_copy_in_and_never_deletes_first(tmp_path, monkeypatch):
    _save(tmp_path, 3)
    events = []
    real_replace, real_rmtree = ckpt.os.replace, shutil.rmtree

    def replace(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        events.append(("remove", Path(path).name))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr("cat_engine.engine.files.os.replace", replace)
    monkeypatch.setattr("cat_engine.engine.files.shutil.rmtree", rmtree)
    _save(tmp_path, 3)
    kinds = [e[0] for e in events]
    assert kinds == ["rename", "rename", "remove"], events
    assert events[0][1] == "step-3" and events[1][2] == "step-3" and events[2][1] == events[0][2]
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step-3") is None


@pytest.mark.parametrize("leftover", ["tmp", "old"])
def test_tidy_restores_a_complete_copy_that_a_killed_swap_left_hidden(tmp_path, leftover):
    path = _save(tmp_path, 2)
    content = _bytes(path)
    hidden = path.with_name(f".step-2.{leftover}-4242-abcd")
    path.rename(hidden)
    (tmp_path / "checkpoints" / ".step-2.tmp-half").mkdir()  # an incomplete write beside it
    assert ckpt.list_checkpoints(tmp_path) == []
    done = ckpt.tidy_checkpoints(tmp_path)
    assert any("restored" in line for line in done)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    assert _bytes(path) == content and ckpt.resolve_resume("latest", tmp_path) == path


def test_tidy_removes_stale_temporaries_and_half_pruned_folders(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    root = tmp_path / "checkpoints"
    (root / ".step-1.pruned-77").mkdir()
    (root / ".step-3.tmp-abc").mkdir()
    (root / ".step-3.tmp-abc" / "lora.safetensors").write_bytes(b"half")
    (root / ".step-2.old-1-x").mkdir()  # step-2 exists: the old copy of a finished swap
    ckpt.tidy_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2"]


def test_pruning_keeps_the_new_checkpoint_and_never_touches_newer_ones(tmp_path):
    params = _setup()
    for step in (1, 2, 20):
        _save(tmp_path, step, params)
    _save(tmp_path, 3, params, keep=2)  # step-20 is newer: it is not pruning's business
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-2", "step-3", "step-20"]
    _save(tmp_path, 4, params, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-4", "step-20"]


def test_a_failed_save_names_the_folder_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    import errno

    params = _setup()
    first = _save(tmp_path, 1, params)
    before = _bytes(first)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"step-2: cannot write it \(No space left on device\)"):
        _save(tmp_path, 2, params, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
    assert _bytes(first) == before


def test_extra_files_are_saved_verified_and_loaded(tmp_path):
    from safetensors.torch import save_file

    def write_extra(folder):
        save_file({"t.lora_A.weight": torch.ones(2, 3)}, str(folder / "text_encoder_lora.safetensors"))

    path = _save(tmp_path, 1, extra=write_extra)
    assert "text_encoder_lora.safetensors" in json.loads((path / ckpt.MANIFEST_FILE).read_text())["files"]
    loaded = ckpt.load_checkpoint(path)
    assert torch.equal(loaded["extra"]["text_encoder_lora.safetensors"]["t.lora_A.weight"], torch.ones(2, 3))
    (path / "text_encoder_lora.safetensors").write_bytes(b"0" * 10)
    with pytest.raises(ckpt.CheckpointError, match="text_encoder_lora.safetensors"):
        ckpt.load_checkpoint(path)


def test_checkpoint_files_and_folders_get_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = _save(tmp_path, 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o644}
