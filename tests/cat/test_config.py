import argparse
from pathlib import Path

import pytest

from cat_engine.cat.config import (
    IDENTITY,
    NUMERIC_BOUNDS,
    OPTIONS,
    ConfigError,
    TrainConfig,
    add_config_arguments,
    build_config,
    config_differences,
    flags_of,
    load_yaml,
    run_identity,
)
from cat_engine.engine.errors import CatEngineError
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


# ----------------------------------------------------------------- strict values, before any work
@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"max_grad_norm": -1.0},
            r"--max-grad-norm must be a finite number > 0, got -1.0",
        ),  # flipped gradients
        ({"max_grad_norm": float("nan")}, r"--max-grad-norm must be a finite number > 0, got nan"),
        ({"lr": 1e39}, r"--lr must be a finite number > 0 and <= 1, got 1e\+39"),
        ({"lr": float("inf")}, r"--lr must be a finite number"),
        ({"lr": 1e30}, r"--lr must be a finite number > 0 and <= 1"),
        ({"alpha": float("nan")}, r"--alpha must be a finite number > 0, got nan"),
        ({"alpha": 0.0}, r"--alpha must be a finite number > 0, got 0.0"),
        ({"cat_weight": 1e39}, r"--cat-weight must be a finite number >= 0"),
        ({"seed": 99999999999999999999}, r"--seed must be >= 0 and <= 18446744073709551615 \(64 bits\)"),
        ({"seed": -1}, r"--seed must be >= 0"),
        ({"rank": 129}, r"--rank must be >= 1 and <= 128 \(the LoRA kernels' limit\), got 129"),
        ({"rank": 1024}, r"--rank must be .* <= 128"),
        (
            {"resume": "latest", "overwrite": True},
            "--resume continues the run in --output, --overwrite replaces it",
        ),
        ({"steps": 2.9}, r"option steps: expected an integer, got 2\.9"),
        ({"rank": True}, r"option rank: expected an integer, got True"),
        ({"gradient_checkpointing": "false"}, r"expected true or false, got 'false'"),
        ({"targets": 5}, r"option targets: expected a list of names"),
        ({"data": {"a": 1}}, r"option data: expected a string, got \{'a': 1\}"),
        ({"steps": None}, r"option steps: a value is required"),
        (
            {"concepts": [{"data": {"a": 1}, "token": "x", "class_word": "y"}]},
            r"concepts\[0\]: data: expected a string",
        ),
    ],
)
def test_every_value_is_checked_before_work_starts(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config(values, {})


def test_the_rank_limit_is_the_kernels_own():
    from cat_engine.kernels.lora_linear import MAX_RANK

    assert build_config({"rank": MAX_RANK}, {}).rank == MAX_RANK
    with pytest.raises(ConfigError, match=f"<= {MAX_RANK}"):
        build_config({"rank": MAX_RANK + 1}, {})


def test_every_numeric_option_has_a_range():
    numeric = {n for n, o in OPTIONS.items() if o.type.removesuffix(" | None") in ("int", "float")}
    assert numeric == set(NUMERIC_BOUNDS), "add the new option's range to NUMERIC_BOUNDS"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            'gradient_checkpointing: "false"\n',
            r"gradient_checkpointing: expected true or false, got 'false' \(a string: write it without quotes\)",
        ),
        ("flip: yes\n", r"flip: expected true or false, got 'yes'"),
        ("steps: 2.9\n", r"steps: expected an integer, got 2\.9"),
        ("rank: true\n", r"rank: expected an integer, got True"),
        ("targets: 5\n", r"targets: expected a list of names"),
        ("data: {a: 1}\n", r"data: expected a string, got \{'a': 1\}"),
        ("rank: 4\nlr: 1e-3\nrank: 8\n", r"key 'rank' appears twice \(line 3\)"),
        ("save-every: 3\nsave_every: 4\n", r"save_every is given twice"),
        ("steps:\n", r"steps: a value is required"),
    ],
)
def test_yaml_types_are_strict_and_the_message_names_file_and_key(tmp_path, text, message):
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"--config .*run\.yaml: " + message):
        build_config(load_yaml(f), {})


def test_yaml_reads_what_the_user_means(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("lr: 1e-4\nalpha: 8\ntoken: no\nclass_word: on\nflip: true\ntargets: [to_q, to_v]\n")
    config = build_config(load_yaml(f), {})
    assert config.lr == 1e-4 and config.alpha == 8.0 and isinstance(config.alpha, float)
    assert (config.token, config.class_word, config.flip) == ("no", "on", True)  # yes/no/on/off are words
    assert config.targets == ["to_q", "to_v"]


def test_run_identity_compares_folders_resolved_and_alpha_effective(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = run_identity(TrainConfig(data="photos", rank=4, targets=["to_v", "to_q"]).to_dict())
    b = run_identity(
        TrainConfig(data=str(tmp_path / "photos"), rank=4, alpha=4.0, targets=["to_q", "to_v"]).to_dict()
    )
    assert a == b
    assert run_identity(TrainConfig(seed=1).to_dict()) != run_identity(TrainConfig().to_dict())
    assert set(run_identity(TrainConfig(targets=["to_q"]).to_dict())) == set(IDENTITY)
    assert "targets" not in run_identity(TrainConfig().to_dict())  # the model family's, decided later


def test_a_config_built_in_python_is_checked_as_strictly():
    with pytest.raises(ConfigError, match=r"--rank: expected an integer, got 4\.5"):
        TrainConfig(rank=4.5).validate()
    with pytest.raises(ConfigError, match=r"--steps: a value is required"):
        TrainConfig(steps=None).validate()
    config = TrainConfig(output=Path("out"), lr=1, targets="to_q, to_v").validate()
    assert (config.output, config.lr, config.targets) == ("out", 1.0, ["to_q", "to_v"])
    assert isinstance(config.lr, float)


@pytest.mark.parametrize(
    "flags, yaml, mode",
    [
        ([], "", False),
        (["--compile"], "", "default"),  # a plain --compile, as before
        (["--compile", "reduce-overhead"], "", "reduce-overhead"),
        (["--compile", "max-autotune"], "", "max-autotune"),
        (["--no-compile"], "compile: true\n", False),
        ([], "compile: true\n", "default"),  # old YAML
        ([], "compile: max-autotune\n", "max-autotune"),
        (["--compile"], "compile: false\n", "default"),
    ],
)
def test_compile_takes_a_mode_and_old_forms_still_work(tmp_path, flags, yaml, mode):
    from cat_engine.cat.config import config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    f = tmp_path / "run.yaml"
    f.write_text(yaml or "rank: 4\n")
    args = parser.parse_args(["--config", str(f), *flags])
    config = config_from_args(args)
    assert config.memory.compile == mode
    assert config_from_args(parser.parse_args(flags_of(args))).memory.compile == mode  # relaunch (--nproc)
    assert TrainConfig.from_dict(config.to_dict()).memory.compile == mode


def test_a_bad_compile_mode_is_a_one_line_error():
    with pytest.raises(
        CatEngineError, match=r"compile must be one of default, reduce-overhead, max-autotune"
    ):
        build_config({"compile": "fastest"}, {})


def test_every_option_has_a_row_in_the_readme_table():
    """The README's option table is the user's reference: a new option without a row fails here."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("### Options of `cat-engine train`") : readme.index("### Coming from kohya")]
    flags = {"concepts": "--concept"}  # the YAML list; its flag takes one concept at a time
    missing = [
        name
        for name in OPTIONS
        if (flags.get(name) or "--" + name.replace("_", "-")) not in table
        and "--no-" + name.replace("_", "-") not in table
    ]
    assert not missing, f"options without a README row: {missing}"
