"""The training recipe end to end on the built-in tiny model: outputs, resume, interrupts, errors."""

import itertools
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.engine import checkpoint as ckpt
from cat_engine.engine import signals
from cat_engine.engine.checkpoint import CHECKPOINTS, MANIFEST_FILE, STATE_FILE, list_checkpoints
from cat_engine.engine.lora import LORA_WEIGHT_NAME, read_lora_metadata
from cat_engine.engine.run_folder import RunFolderError

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
    (state_file.parent / MANIFEST_FILE).unlink()  # checkpoints of those versions had no manifest
    with caplog.at_level("WARNING", logger="cat_engine"):
        resumed = _weights(_train(tmp_path, "split", steps=6, resume="latest"))
    assert "different option" not in caplog.text
    # The saved form is still the flat one: the same keys, in the same order (and options added since).
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


# ------------------------------------------------------- signals, checkpoints and the output folder
SIGNAL_RUN = dict(rank=4, steps=4, save_every=3, batch_size=1, lr=1e-3, keep_checkpoints=10)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run with a checkpoint at every step: what every stopped and resumed run must equal."""
    from cat_engine.engine.builtin import builtin_model_dir

    out = tmp_path_factory.mktemp("straight") / "run"
    config = TrainConfig(**{**SIGNAL_RUN, "save_every": 1}, base=str(builtin_model_dir(pretrained=False)))
    config.output = str(out)
    train_mod.train(config.validate(), progress=False)
    return out


def _run(tmp_path, **overrides):
    return _train(tmp_path, "run", **{**SIGNAL_RUN, **overrides})


def _checkpoint_tensors(path):
    return {
        name: load_file(str(path / name)) for name in (ckpt.LORA_FILE, ckpt.OPTIMIZER_TENSORS, ckpt.RNG_FILE)
    }


def _assert_same_state(a, b):
    ta, tb = _checkpoint_tensors(a), _checkpoint_tensors(b)
    for file in ta:
        assert ta[file].keys() == tb[file].keys(), file
        for key in ta[file]:
            assert torch.equal(ta[file][key], tb[file][key]), (file, key)


def _signal_at(monkeypatch, moment, signum, call=1):
    """Send ``signum`` to this process from inside the recipe at ``moment``, on its ``call``-th pass (0-based)."""
    calls = itertools.count()

    def tick(*_):
        if next(calls) == call:
            os.kill(os.getpid(), signum)

    if moment == "noise draws":  # after the step's random draws
        real_draw = train_mod.draw_batch
        monkeypatch.setattr(train_mod, "draw_batch", lambda *a, **k: (real_draw(*a, **k), tick())[0])
    elif moment == "forward":
        real_loss = train_mod.training_loss

        def training_loss(*args, **kwargs):
            loss = real_loss(*args, **kwargs)
            return lambda model, batch: (loss(model, batch), tick())[0]

        monkeypatch.setattr(train_mod, "training_loss", training_loss)
    elif moment in ("backward", "optimizer.step"):
        real_make = train_mod.make_optimizer

        def make_optimizer(params, *args, **kwargs):
            optimizer = real_make(params, *args, **kwargs)
            if moment == "backward":
                params[0].register_hook(lambda grad: tick())
            else:  # after the parameters changed, inside optimizer.step()
                optimizer.register_step_post_hook(tick)
            return optimizer

        monkeypatch.setattr(train_mod, "make_optimizer", make_optimizer)
    elif moment == "after a checkpoint":
        real_save = ckpt.save_checkpoint
        monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: (real_save(*a, **k), tick())[0])
    elif moment == "setup":
        real_prepare = train_mod.prepare_data
        monkeypatch.setattr(train_mod, "prepare_data", lambda *a, **k: (tick(), real_prepare(*a, **k))[1])


@pytest.mark.parametrize(
    "moment, signum, kept",
    [
        ("noise draws", signal.SIGTERM, 2),
        ("forward", signal.SIGINT, 2),
        ("backward", signal.SIGTERM, 2),
        ("optimizer.step", signal.SIGINT, 2),
        ("optimizer.step", signal.SIGTERM, 2),
        ("after a checkpoint", signal.SIGTERM, 3),  # the periodic one of step 3: kept, not written again
    ],
)
def test_a_signal_inside_a_step_stops_after_it_with_a_checkpoint_that_resumes_bit_exactly(
    tmp_path, monkeypatch, straight, moment, signum, kept
):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_at(patch, moment, signum, call=0 if moment == "after a checkpoint" else 1)
        with pytest.raises(signals.Interrupted) as info:
            _run(tmp_path)
    path = out / CHECKPOINTS / f"step-{kept}"
    assert info.value.exit_code == 128 + signum
    assert str(info.value) == (
        f"interrupted by {signal.Signals(signum).name} after step {kept}: "
        f"checkpoint {path}; continue with --resume latest"
    )
    assert [p.name for p in list_checkpoints(out)] == [f"step-{kept}"]
    _assert_same_state(path, straight / CHECKPOINTS / f"step-{kept}")  # weights, optimizer and RNG alike
    resumed = _weights(_run(tmp_path, resume="latest"))
    expected = _weights(straight / LORA_WEIGHT_NAME)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    log = [json.loads(line)["step"] for line in (out / train_mod.LOG_FILE).read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_a_signal_during_setup_stops_at_once_and_frees_the_folder(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _signal_at(patch, "setup", signal.SIGINT, call=0)
        with pytest.raises(signals.Interrupted, match="stopped by SIGINT before training began"):
            _run(tmp_path, steps=1)
    assert list_checkpoints(tmp_path / "run") == []
    _run(tmp_path, steps=1)  # the lock went with the interrupted run


def test_a_second_signal_aborts_at_once_without_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)
    _signal_at(monkeypatch, "noise draws", signal.SIGTERM, call=3)  # the stop request, in step 4 ...
    _signal_at(monkeypatch, "optimizer.step", signal.SIGTERM, call=3)  # ... and a second inside its update
    with pytest.raises(signals.Aborted) as info:
        _run(tmp_path, steps=6)
    step3 = tmp_path / "run" / CHECKPOINTS / "step-3"
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert str(info.value) == (
        f"aborted by a second SIGTERM during step 4, nothing more written; last good checkpoint: {step3}"
    )
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-3"]
    assert ckpt.verify_checkpoint(step3) is None


def test_two_signals_at_once_are_one_request(tmp_path, monkeypatch):
    """A launcher and a scheduler that both forward the signal must not abort the checkpoint."""
    _signal_at(monkeypatch, "noise draws", signal.SIGTERM, call=1)
    _signal_at(monkeypatch, "optimizer.step", signal.SIGTERM, call=1)
    with pytest.raises(signals.Interrupted, match="after step 2: checkpoint"):
        _run(tmp_path)


def _inside_optimizer_step(monkeypatch, call, action):
    """Run ``action(params)`` inside the ``call``-th optimizer step (0-based), after the update."""
    real_make, calls = train_mod.make_optimizer, itertools.count()

    def make_optimizer(params, *args, **kwargs):
        optimizer = real_make(params, *args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: action(params) if next(calls) == call else None)
        return optimizer

    monkeypatch.setattr(train_mod, "make_optimizer", make_optimizer)


def test_an_interrupt_while_the_adapter_is_updated_writes_nothing(tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside optimizer.step by other means than the engine's handlers
    (they defer signals) would leave half-updated tensors: no checkpoint of that state is written."""

    def interrupt(params):
        raise KeyboardInterrupt

    _inside_optimizer_step(monkeypatch, 3, interrupt)
    with pytest.raises(
        KeyboardInterrupt, match="while updating the adapter in step 4: no checkpoint written"
    ):
        _run(tmp_path, steps=6)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-3"]


@pytest.mark.parametrize("save_every", [1, 0])
def test_a_non_finite_adapter_is_never_saved_as_the_last_good_checkpoint(tmp_path, monkeypatch, save_every):
    """The update of step 2 turns the adapter infinite (as --lr inf did): step-2 is not written, and
    the stop names the checkpoint that is still good (step-1), or says there is none."""
    _inside_optimizer_step(monkeypatch, 1, lambda params: params[0].data.fill_(float("inf")))
    with pytest.raises(train_mod.TrainingError) as info:
        _run(tmp_path, save_every=save_every)
    out = tmp_path / "run"
    if save_every:
        assert "step-2: not written" in str(info.value) and "NaN or infinite" in str(info.value)
        assert str(info.value).endswith(f"last good checkpoint: {out / CHECKPOINTS / 'step-1'}")
        assert [p.name for p in list_checkpoints(out)] == ["step-1"]
    else:
        assert "the adapter was already non-finite after step 2, not saved; no checkpoint written yet" in str(
            info.value
        )
        assert list_checkpoints(out) == []
    assert not (out / LORA_WEIGHT_NAME).exists()


def test_an_output_holding_another_run_is_refused_and_kept(tmp_path):
    lora = _run(tmp_path, steps=2)
    before = {p: p.read_bytes() for p in (lora, tmp_path / "run" / train_mod.LOG_FILE)}
    with pytest.raises(RunFolderError, match="holds another run .*--resume latest.*--overwrite"):
        _run(tmp_path, steps=2, seed=1)
    with pytest.raises(RunFolderError, match=r"other settings \(seed: 0 -> 1\)"):
        _run(tmp_path, steps=3, seed=1, resume="latest")
    assert {p: p.read_bytes() for p in before} == before
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-2"]
    _run(tmp_path, steps=1, seed=1, overwrite=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-1"]
    log = (tmp_path / "run" / train_mod.LOG_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1]


def test_steps_at_or_below_the_checkpoint_say_so(tmp_path, caplog):
    _run(tmp_path, steps=3)
    step3 = tmp_path / "run" / CHECKPOINTS / "step-3"
    with pytest.raises(
        ConfigError, match=rf"--steps 2 is below the step of the checkpoint to resume \({step3}: step 3\)"
    ):
        _run(tmp_path, steps=2, resume="latest")
    with caplog.at_level("WARNING", logger="cat_engine"):
        _run(tmp_path, steps=3, resume="latest")
    assert "nothing left to train" in caplog.text


def test_resuming_an_older_checkpoint_puts_the_newer_ones_aside(tmp_path, straight):
    _run(tmp_path, save_every=1)
    step2 = tmp_path / "run" / CHECKPOINTS / "step-2"
    lora = _weights(_run(tmp_path, resume=str(step2)))
    expected = _weights(straight / LORA_WEIGHT_NAME)
    assert all(torch.equal(expected[k], lora[k]) for k in expected)
    names = sorted(p.name for p in (tmp_path / "run" / CHECKPOINTS).iterdir())
    assert names == ["step-1", "step-2", "step-3", "step-3.superseded", "step-4", "step-4.superseded"]
    log = [
        json.loads(line)["step"] for line in (tmp_path / "run" / train_mod.LOG_FILE).read_text().splitlines()
    ]
    assert log == [1, 2, 3, 4]


def test_a_64_bit_seed_trains():
    from cat_engine.cat.buckets import BatchSampler, sample_indices

    assert len(sample_indices(3, 2, 6, 2**64 - 1)) == 2
    assert len(BatchSampler([[0, 1, 2], [3, 4, 5]], 2, 2**64 - 1).indices(3)) == 2


def test_resuming_with_the_default_targets_checks_them_against_the_checkpoint(tmp_path):
    """Not given, --targets are the model family's (known once it is loaded): a checkpoint trained on
    more modules is refused then, not resumed with its extra tensors dropped."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]
    _run(tmp_path, steps=1, save_every=1, targets=targets)
    with pytest.raises(
        ckpt.CheckpointError, match=r"LoRA tensors this model does not adapt .*other --targets"
    ):
        _run(tmp_path, steps=2, resume="latest", targets=None)
@pytest.mark.parametrize(
    "args, message",
    [
        (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device; this run is on cpu"),
        (["--compile", "fastest"], "compile must be one of default, reduce-overhead, max-autotune"),
    ],
)
def test_graph_and_compile_options_are_refused_in_one_line_before_training(tmp_path, capsys, args, message):
    from cat_engine import cli

    assert cli.main(["train", "--steps", "1", "--output", str(tmp_path / "out"), *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists()  # nothing was started
