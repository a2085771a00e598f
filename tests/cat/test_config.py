import argparse

import pytest

from cat_engine.cat.config import (
    OPTIONS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
    build_config,
    config_differences,
    flags_of,
    load_yaml,
)
from cat_engine.engine.memory_plan import MemoryPlan


def test_flags_override_file_and_file_overrides_defaults(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("rank: 8\nlr: 3e-4\ncat-weight: 0.5\ntargets: to_q,to_v\n")
    config = build_config(load_yaml(f), {"rank": 4, "lr": None})
    assert config.rank == 4  # flag wins
    assert config.lr == pytest.approx(3e-4)  # file wins over default
    assert config.cat_weight == 0.5
    assert config.targets == ["to_q", "to_v"]
    assert config.steps == TrainConfig().steps  # default


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rank: 8\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'learning_rate'"):
        load_yaml(f)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml(tmp_path / "missing.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("rank: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(f)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"plain_mode": "x"}, "--plain-mode"),
        ({"rank": 0}, "--rank"),
        ({"steps": 0}, "--steps"),
        ({"cat_weight": -1.0}, "--cat-weight"),
        ({"resolution": 100}, "multiple of 8"),
        ({"rank": "abc"}, "rank"),
    ],
)
def test_validation_messages(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, {})


def test_config_differences_ignore_run_only_options():
    saved = TrainConfig(steps=10, output="a").to_dict()
    assert config_differences(saved, TrainConfig(steps=20, output="b")) == []
    diffs = config_differences(saved, TrainConfig(rank=4))
    assert diffs == ["rank: checkpoint 16, now 4"]


def test_the_memory_plan_is_one_field_with_flat_flags_and_keys(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("precision: bf16\ngradient-checkpointing: true\n")
    config = build_config(load_yaml(f), {"attention": "math", "channels_last": True, "compile": None})
    assert config.memory == MemoryPlan(
        precision="bf16", gradient_checkpointing=True, attention="math", channels_last=True
    )
    assert TrainConfig().memory == MemoryPlan(precision="auto")  # fp32 on a CPU, half on a GPU
    flat = config.to_dict()
    assert "memory" not in flat and flat["precision"] == "bf16" and flat["attention"] == "math"
    assert TrainConfig.from_dict(flat) == config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"precision": "fp8"}, "--precision must be one of fp32, bf16, fp16, auto"),
        ({"attention": "flash"}, "--attention must be one of sdpa, xformers, math"),
        ({"memory": {"precision": "bf16"}}, "unknown option 'memory'"),
    ],
)
def test_memory_options_are_checked_with_the_flag_name(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, {})


def test_a_saved_config_of_the_flat_form_compares_option_by_option():
    """Checkpoints written before the memory plan became a field hold the same flat dict."""
    old = {
        **{k: v for k, v in TrainConfig().to_dict().items() if k not in ("precision", "attention")},
        "precision": "bf16",
        "attention": "sdpa",
    }
    assert config_differences(old, TrainConfig()) == ["precision: checkpoint 'bf16', now 'auto'"]
    assert TrainConfig.from_dict(old).memory.precision == "bf16"


def test_help_comes_from_the_fields_with_their_defaults(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    for name, option in OPTIONS.items():
        if name != "concepts":
            assert "--" + name.replace("_", "-") in help_text, name
        assert " ".join(option.help.split()) in help_text, name
    assert "LoRA rank (default: 16)" in help_text
    assert "(default: the base model family's: to_q,to_k,to_v,to_out.0 for SD/SDXL," in help_text
    assert "LoRA alpha (default: the rank, i.e. scale 1)" in help_text
    assert "(default: 'a photo of {token} {class_word}')" in help_text
    assert "(default: auto)" in help_text and "~30% more time" in help_text


def test_flags_of_gives_back_the_same_options():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    argv = ["--rank", "4", "--precision", "bf16", "--no-flip", "--gradient-checkpointing"]
    argv += ["--targets", "to_q,to_v", "--concept", "a:b/c:sks:dog", "--config", "x.yaml"]
    args = parser.parse_args(argv)
    again = parser.parse_args(flags_of(args))
    assert vars(again) == vars(args)
