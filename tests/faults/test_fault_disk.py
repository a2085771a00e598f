"""A full disk at each write of a run (a checkpoint, the final LoRA, the log) and an output the
process cannot write: one line naming the file and the problem, exit code 2, and every file saved
before the failure exactly as it was."""

from __future__ import annotations

import itertools

from faultkit import one_error, run_cli, snapshot, train_argv

import cat_engine.cat.train as train_mod
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine.lora import LORA_WEIGHT_NAME


def _fill_before_call(monkeypatch, owner, name, disk, call):
    real, calls = getattr(owner, name), itertools.count()

    def wrapper(*args, **kwargs):
        if next(calls) == call:
            disk.fill()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_a_full_disk_at_a_checkpoint(disk, capsys, monkeypatch):
    out = disk.root / "run"
    _fill_before_call(monkeypatch, ckpt, "save_checkpoint", disk, call=1)  # step 4's, after step 2's
    saved = {}
    real_train = train_mod.Trainer.save_checkpoint

    def remember(self, *args, **kwargs):  # what was on disk just before the failing save
        saved.update(snapshot(out / ckpt.CHECKPOINTS))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.Trainer, "save_checkpoint", remember)
    code, lines = run_cli(capsys, train_argv(out, "--steps", "6"))
    step2, step4 = out / ckpt.CHECKPOINTS / "step-2", out / ckpt.CHECKPOINTS / "step-4"
    assert code == 2
    assert one_error(lines) == (
        f"cat-engine train: error: checkpoint {step4}: cannot write it (No space left on device); "
        f"last good checkpoint: {step2}"
    )
    assert snapshot(out / ckpt.CHECKPOINTS) == saved  # step-2 as it was, no half step-4, no temporary
    assert ckpt.verify_checkpoint(step2) is None and not (out / LORA_WEIGHT_NAME).exists()


def test_a_full_disk_at_the_final_lora_keeps_the_earlier_lora_and_the_final_checkpoint(
    disk, capsys, monkeypatch
):
    out = disk.root / "run"
    assert run_cli(capsys, train_argv(out, "--steps", "2"))[0] == 0
    earlier = (out / LORA_WEIGHT_NAME).read_bytes()
    real_write, earlier_files = train_mod.Trainer.write_lora, snapshot(out)

    def write_lora(self, folder):  # the disk fills before the final LoRA files (not a checkpoint's)
        if folder == self.output:
            disk.fill()
        return real_write(self, folder)

    with monkeypatch.context() as patch:
        patch.setattr(train_mod.Trainer, "write_lora", write_lora)
        code, lines = run_cli(capsys, train_argv(out, "--steps", "4", "--resume", "latest"))
    step4 = out / ckpt.CHECKPOINTS / "step-4"
    assert code == 2
    assert one_error(lines) == (
        f"cat-engine train: error: {out}: cannot write the LoRA files (No space left on device); "
        f"the run is complete in {step4}: free space and run again with --resume latest"
    )
    assert (out / LORA_WEIGHT_NAME).read_bytes() == earlier and ckpt.verify_checkpoint(step4) is None
    after = snapshot(out)
    assert all(after[k] == v for k, v in earlier_files.items() if k.endswith(".safetensors") and "/" not in k)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name) == []
    disk.free()  # as the message says: then the LoRA of step 4, nothing trained again
    code, lines = run_cli(capsys, train_argv(out, "--steps", "4", "--resume", "latest"))
    assert code == 0 and any("nothing left to train" in line for line in lines)
    assert (out / LORA_WEIGHT_NAME).read_bytes() != earlier


def test_a_full_disk_at_the_log(injected_disk, capsys, monkeypatch):
    out = injected_disk.root / "run"
    real_save, state = train_mod.Trainer.save_checkpoint, {}

    def save_then_fill(self, *args, **kwargs):  # the disk fills right after step 2's checkpoint
        path = real_save(self, *args, **kwargs)
        state.update(snapshot(out / ckpt.CHECKPOINTS))
        injected_disk.fill()
        return path

    monkeypatch.setattr(train_mod.Trainer, "save_checkpoint", save_then_fill)
    code, lines = run_cli(capsys, train_argv(out, "--steps", "6"))
    assert code == 2
    assert one_error(lines) == (
        f"cat-engine train: error: {out / train_mod.LOG_FILE}: cannot write it (No space left on device) "
        f"after step 3; last good checkpoint: {out / ckpt.CHECKPOINTS / 'step-2'}"
    )
    assert snapshot(out / ckpt.CHECKPOINTS) == state


def test_an_output_that_cannot_be_written_or_is_a_file(read_only_folder, tmp_path, capsys):
    code, lines = run_cli(capsys, train_argv(read_only_folder / "run"))
    assert code == 2
    line = one_error(lines)
    assert line.startswith(
        f"cat-engine train: error: --output {read_only_folder / 'run'}: cannot create it ("
    )
    assert "Read-only file system" in line or "Permission denied" in line
    (tmp_path / "taken").write_text("a file of the user's")
    code, lines = run_cli(capsys, train_argv(tmp_path / "taken"))
    assert code == 2 and one_error(lines).endswith(f"--output {tmp_path / 'taken'}: is a file, not a folder")
    assert (tmp_path / "taken").read_text() == "a file of the user's"
