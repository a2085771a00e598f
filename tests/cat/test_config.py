import pytest

from cat_engine.cat.config import ConfigError, TrainConfig, build_config, config_differences, load_yaml


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
