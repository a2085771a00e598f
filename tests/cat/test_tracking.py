"""--log-with: TensorBoard for real (when installed), W&B through a stand-in module, and the
one-line message when the package is missing."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

import cat_engine.cat.train as train_mod
from cat_engine.cat import tracking
from cat_engine.cat.config import TrainConfig
from cat_engine.engine.builtin import builtin_model_dir

FAST = dict(rank=4, steps=2, batch_size=2, lr=1e-3, save_every=0)
STEP_KEYS = {f"train/{k}" for k in tracking.SCALARS}


def _train(tmp_path, **overrides):
    base = str(builtin_model_dir(pretrained=False))
    config = TrainConfig(base=base, output=str(tmp_path / "out"), **{**FAST, **overrides}).validate()
    return train_mod.train(config, progress=False)


def test_tensorboard_gets_every_curve_and_the_sample_grid(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path, log_with="tensorboard", sample_every=2, sample_steps=2, sample_seeds=1)
    events = EventAccumulator(str(tmp_path / "out" / tracking.LOGS), size_guidance={"images": 0}).Reload()
    assert set(events.Tags()["scalars"]) == STEP_KEYS
    assert [e.step for e in events.Scalars("train/ldm")] == [1, 2]
    assert [e.step for e in events.Images("samples")] == [2]


def _fake_wandb(calls):
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # libraries probe find_spec("wandb")

    class Run:
        name = "fake"

        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    module.init = init
    module.Image = lambda image: ("image", image.size)
    return module


def test_wandb_runs_offline_without_a_login_and_logs_curves_and_grids(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    _train(tmp_path, log_with="wandb", sample_every=2, sample_steps=2, sample_seeds=1)
    init = calls[0][1]
    assert (
        init["mode"] == "offline" and init["project"] == "cat-engine" and init["dir"] == str(tmp_path / "out")
    )
    assert init["config"]["log_with"] == "wandb"
    scalars = [c for c in calls if c[0] == "log" and "train/ldm" in c[2]]
    assert [c[1] for c in scalars] == [1, 2] and set(scalars[0][2]) == STEP_KEYS
    grids = [c for c in calls if c[0] == "log" and "samples" in c[2]]
    assert [(c[1], c[2]["samples"][0]) for c in grids] == [(2, "image")]
    assert calls[-1] == ("finish",)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_saying_what_to_install(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # its import fails as if not installed
    config = TrainConfig(output=str(tmp_path), log_with=name).validate()
    with pytest.raises(tracking.TrackerUnavailable) as info:
        tracking.make_tracker(config)
    assert (
        str(info.value)
        == f"--log-with {name} needs {name}, which is not installed: pip install 'cat-engine[{name}]'"
    )
