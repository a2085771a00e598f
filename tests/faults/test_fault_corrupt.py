"""Corrupt checkpoints, as a disk or a user leaves them: ``--resume latest`` warns, names the bad one
and continues from the newest good one (then replaces the bad one by a swap); naming a corrupt one
is one line. The good checkpoints are never touched."""

from __future__ import annotations

import shutil

import pytest
from faultkit import one_error, run_cli, snapshot, train_argv
from safetensors.torch import load_file, save_file

from cat_engine.engine import checkpoint as ckpt


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A run of 3 steps with a checkpoint each (made once, copied by each test)."""
    from faultkit import tiny_base

    import cat_engine.cat.train as train_mod
    from cat_engine.cat.config import TrainConfig

    out = tmp_path_factory.mktemp("corrupt") / "run"
    config = TrainConfig(
        base=tiny_base(), rank=4, batch_size=1, lr=1e-3, steps=3, save_every=1, keep_checkpoints=10
    )
    config.output, config.device = str(out), "cpu"
    train_mod.train(config.validate(), progress=False)
    return out


def _truncate(step):
    data = (step / ckpt.LORA_FILE).read_bytes()
    (step / ckpt.LORA_FILE).write_bytes(data[: len(data) // 3])


def _nan(step):  # a poisoned file with a manifest that matches it: only the values tell
    tensors = load_file(str(step / ckpt.OPTIMIZER_TENSORS))
    save_file({k: v * float("nan") for k, v in tensors.items()}, str(step / ckpt.OPTIMIZER_TENSORS))
    (step / ckpt.MANIFEST_FILE).write_text(__import__("json").dumps(ckpt.manifest_of(step)))


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (_truncate, "lora.safetensors has"),
        (_nan, "optimizer.safetensors: 0.exp_avg holds NaN or infinite values"),
    ],
)
def test_resume_latest_skips_a_corrupt_newest_checkpoint(
    three_checkpoints, tmp_path, capsys, corrupt, problem
):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    step3 = out / ckpt.CHECKPOINTS / "step-3"
    corrupt(step3)
    good = {s: snapshot(out / ckpt.CHECKPOINTS / s) for s in ("step-1", "step-2")}
    code, lines = run_cli(capsys, train_argv(out, "--steps", "4", "--save-every", "1", "--resume", "latest"))
    assert code == 0, lines
    warning = [line for line in lines if "skipping" in line]
    assert len(warning) == 1 and warning[0].startswith(
        f"cat-engine: warning: --resume latest: skipping checkpoint {step3}: "
    )
    assert problem in warning[0]
    assert any(f"resumed from {out / ckpt.CHECKPOINTS / 'step-2'} at step 2" in line for line in lines)
    assert {s: snapshot(out / ckpt.CHECKPOINTS / s) for s in good} == good
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-1", "step-2", "step-3", "step-4"]
    assert ckpt.verify_checkpoint(step3) is None  # the corrupt one replaced by a good one, by a swap


def test_resuming_a_named_corrupt_checkpoint_is_one_line(three_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    step3 = out / ckpt.CHECKPOINTS / "step-3"
    (step3 / ckpt.RNG_FILE).write_bytes(b"")
    before = snapshot(out)
    code, lines = run_cli(capsys, train_argv(out, "--steps", "4", "--resume", str(step3)))
    assert code == 2
    assert one_error(lines) == (
        f"cat-engine train: error: checkpoint {step3}: rng.safetensors has 0 bytes, the manifest says "
        f"{len((three_checkpoints / ckpt.CHECKPOINTS / 'step-3' / ckpt.RNG_FILE).read_bytes())}"
    )
    assert snapshot(out) == before
