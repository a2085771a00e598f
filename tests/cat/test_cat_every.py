"""``--cat-every k``: the CAT term on every k-th step at k x lambda, plain LoRA steps between, one RNG stream."""

import json

import pytest
import torch
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import ConfigError, TrainConfig

FAST = dict(rank=4, steps=4, save_every=0, batch_size=2, lr=1e-3)


@pytest.fixture(autouse=True)
def _random_tiny_base():
    from cat_engine.engine.builtin import builtin_model_dir

    FAST["base"] = str(builtin_model_dir(pretrained=False))


def _config(tmp_path, name, **overrides) -> TrainConfig:
    return TrainConfig(output=str(tmp_path / name), **{**FAST, **overrides}).validate()


def _log(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / train_mod.LOG_FILE).read_text().splitlines()]


def test_cat_rows_run_on_every_kth_step_at_k_times_the_weight(tmp_path):
    every = train_mod.Trainer.setup(_config(tmp_path, "every", cat_weight=0.5, cat_every=2))
    # The reference: a k = 1 trainer whose lambda is set by hand to what each step should have.
    by_hand = train_mod.Trainer.setup(_config(tmp_path, "by-hand", cat_weight=1.0))
    for weight in (1.0, 0.0, 1.0, 0.0):
        every.run_step()
        by_hand.runs_cat_rows = lambda w=weight: w > 0  # run_step picks the step's loss from this
        by_hand.run_step()
        assert torch.equal(every.generator.get_state(), by_hand.generator.get_state())
    for name, param in every.lora.items():
        assert torch.equal(param, by_hand.lora[name]), name


def test_the_rng_stream_does_not_depend_on_the_cat_rows_and_resume_is_exact(tmp_path):
    states = []
    for k, weight in ((1, 1.0), (3, 1.0), (1, 0.0)):
        trainer = train_mod.Trainer.setup(_config(tmp_path, f"k{k}-{weight}", cat_weight=weight, cat_every=k))
        for _ in range(3):
            trainer.run_step()
        states.append(trainer.generator.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])

    straight = load_file(str(train_mod.train(_config(tmp_path, "straight", cat_every=3), progress=False)))
    train_mod.train(_config(tmp_path, "split", cat_every=3, steps=2), progress=False)
    resumed = load_file(
        str(train_mod.train(_config(tmp_path, "split", cat_every=3, resume="latest"), progress=False))
    )
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    cats = [r["cat"] for r in _log(tmp_path, "split")]
    assert [c > 0 for c in cats] == [True, False, False, True]  # steps 1 and 4 of 4 run the CAT rows


def test_cat_every_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="--cat-every must be >= 1"):
        _config(tmp_path, "bad", cat_every=0)
