"""The training recipe end to end on the built-in tiny model: outputs, resume, interrupts, errors."""

import itertools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import TrainConfig
from cat_engine.engine.checkpoint import CHECKPOINTS, STATE_FILE, list_checkpoints
from cat_engine.engine.lora import LORA_WEIGHT_NAME, read_lora_metadata

FAST = dict(rank=4, steps=6, save_every=0, batch_size=2, lr=1e-3)
# A config as checkpoints and train_config.json held it before the memory plan became one field.
OLD_FLAT_CONFIG = {
    "base": "builtin",
    "data": None,
    "token": "sks",
    "class_word": "star",
    "caption_template": "a photo of {token} {class_word}",
    "plain_mode": "class",
    "cat_weight": 1.0,
    "concepts": None,
    "rank": 16,
    "alpha": None,
    "targets": ["to_q", "to_k", "to_v", "to_out.0"],
    "lr": 0.0001,
    "lr_warmup_steps": 0,
    "max_grad_norm": 1.0,
    "steps": 20,
    "batch_size": 1,
    "resolution": None,
    "seed": 0,
    "flip": False,
    "precision": "auto",
    "gradient_checkpointing": False,
    "attention": "sdpa",
    "compile": False,
    "channels_last": False,
    "vram_budget": None,
    "output": "cat-output",
    "save_every": 100,
    "keep_checkpoints": 3,
    "resume": None,
    "device": "auto",
}


@pytest.fixture(autouse=True)
def _random_tiny_base(monkeypatch):
    """The recipe tests run on the random tiny model (fast); the CLI test uses the real default."""
    from cat_engine.engine.builtin import builtin_model_dir

    FAST["base"] = str(builtin_model_dir(pretrained=False))


def _train(tmp_path, name, **overrides):
    config = TrainConfig(output=str(tmp_path / name), **{**FAST, **overrides}).validate()
    return train_mod.train(config, progress=False)


def _weights(path):
    return load_file(str(path))


def test_resume_is_bit_exact(tmp_path):
    straight = _weights(_train(tmp_path, "straight"))
    _train(tmp_path, "split", steps=3)
    resumed = _weights(_train(tmp_path, "split", steps=6, resume="latest"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    log = [json.loads(line) for line in (tmp_path / "split" / train_mod.LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "ldm", "cat", "lr", "it_s"} <= r.keys() for r in log)


def _on_call(n, change):
    """A stand-in for ``draw_batch`` that applies ``change`` to the batch of its ``n``-th call (0-based)."""
    real = train_mod.draw_batch
    calls = itertools.count()

    def draw(*args, **kwargs):
        batch = real(*args, **kwargs)
        return change(batch) if next(calls) == n else batch

    return draw


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    straight = _weights(_train(tmp_path, "straight"))

    def interrupt(batch):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_mod, "draw_batch", _on_call(4, interrupt))  # during the 5th step
        with pytest.raises(KeyboardInterrupt):
            _train(tmp_path, "interrupted")
    assert [p.name for p in list_checkpoints(tmp_path / "interrupted")] == ["step-4"]
    resumed = _weights(_train(tmp_path, "interrupted", resume="latest"))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    def nan_target(batch):
        batch.target = batch.target * float("nan")
        return batch

    monkeypatch.setattr(train_mod, "draw_batch", _on_call(4, nan_target))  # the 5th step
    with pytest.raises(train_mod.TrainingError, match=r"loss is nan at step 5.*step-4"):
        _train(tmp_path, "nan", save_every=2)
    names = [p.name for p in list_checkpoints(tmp_path / "nan")]
    assert names == ["step-2", "step-4"]
    assert not (tmp_path / "nan" / LORA_WEIGHT_NAME).exists()


def test_a_checkpoint_with_the_flat_config_of_earlier_versions_resumes(tmp_path, caplog):
    """Checkpoints store the config flat (precision, attention... at the top level, as in YAML files)."""
    straight = _weights(_train(tmp_path, "straight"))
    _train(tmp_path, "split", steps=3)
    state_file = tmp_path / "split" / CHECKPOINTS / "step-3" / STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"] = {**OLD_FLAT_CONFIG, **FAST, "steps": 3, "output": str(tmp_path / "split")}
    state_file.write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="cat_engine"):
        resumed = _weights(_train(tmp_path, "split", steps=6, resume="latest"))
    assert "different option" not in caplog.text
    # The saved form is still the flat one: the same keys, in the same order (options added since
    # then among them).
    saved = list(json.loads((tmp_path / "split" / train_mod.CONFIG_FILE).read_text()))
    assert [k for k in saved if k in OLD_FLAT_CONFIG] == list(OLD_FLAT_CONFIG)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_cat_weight_zero_is_plain_lora_and_metadata_is_written(tmp_path):
    path = _train(tmp_path, "lora", cat_weight=0.0, steps=2)
    log = [json.loads(line) for line in (tmp_path / "lora" / train_mod.LOG_FILE).read_text().splitlines()]
    assert all(r["cat"] == 0.0 and r["loss"] == r["ldm"] for r in log)
    meta = read_lora_metadata(path)
    assert (
        meta["cat_weight"] == 0.0
        and meta["token"] == "sks"
        and meta["r"] == 4
        and meta["plain_mode"] == "class"
    )


def test_sdxl_v_prediction_model_trains(tmp_path):
    from cat_engine.engine.builtin import builtin_model_dir

    base = builtin_model_dir("sdxl", "v_prediction")
    path = _train(tmp_path, "xl", base=str(base), steps=2, plain_mode="strip")
    assert read_lora_metadata(path)["base"] == str(base)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "cat_engine", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_end_to_end_on_builtin_default(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("rank: 4\nsave-every: 2\n")
    result = _cli("train", "--config", str(config), "--steps", "3", "--output", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / LORA_WEIGHT_NAME).is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["step-2", "step-3"]
    assert "ldm=" in result.stderr and "step/s" in result.stderr or "s/step" in result.stderr  # progress bar


@pytest.mark.parametrize(
    "args, message",
    [
        (["--base", "nowhere"], "--base nowhere: no such folder"),
        (["--data", "nowhere"], "nowhere"),
        (["--plain-mode", "bogus"], "--plain-mode must be one of"),
        (["--resume", "latest"], "no checkpoint in"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    result = _cli("train", "--steps", "1", "--output", "out", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr


def test_cli_base_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.ckpt").write_bytes(b"not a model")
    result = _cli("train", "--base", "model", "--output", "out", cwd=tmp_path)
    assert result.returncode == 2 and "not a diffusers model folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_loss_scaling_skips_an_overflowed_step_where_unscaled_training_stops(tmp_path):
    """The step's update: a disabled scaler passes through and a non-finite gradient stops the run;
    an fp16 loss scaler (CUDA in training; its CPU twin here) skips the step and backs off instead."""
    trainer = train_mod.Trainer.setup(TrainConfig(output=str(tmp_path / "s"), **FAST).validate())
    before = [p.detach().clone() for p in trainer.lora.values()]

    def overflowing_loss():
        return sum(p.sum() for p in trainer.lora.values()) * float("inf")

    with pytest.raises(train_mod.TrainingError, match="gradient norm is not finite at step 1"):
        trainer.update(overflowing_loss())
    try:
        trainer.scaler = torch.amp.GradScaler("cpu")
    except (TypeError, RuntimeError, ValueError):
        pytest.skip("this torch has no CPU GradScaler")
    scale = trainer.scaler.get_scale()
    trainer.update(overflowing_loss())
    assert trainer.scaler.get_scale() < scale
    for old, new in zip(before, trainer.lora.values()):
        assert torch.equal(old, new)
