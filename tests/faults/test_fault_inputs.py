"""Bad input, from the command line: exactly one line that names the option or file and the problem,
exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import shutil

import pytest
from faultkit import one_error, run_cli, tiny_base, train_argv

from cat_engine import __version__
from cat_engine.cli import main


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "1e39"], "--lr must be a finite number > 0 and <= 1, got 1e+39"),
        (["--lr", "inf"], "--lr must be a finite number > 0 and <= 1, got inf"),
        (["--alpha", "nan"], "--alpha must be a finite number > 0, got nan"),
        (["--alpha", "0"], "--alpha must be a finite number > 0, got 0.0"),
        (["--seed", "12345678901234567890123"], "--seed must be >= 0 and <= 18446744073709551615 (64 bits)"),
        (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number > 0, got -1.0"),
        (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number > 0, got nan"),
        (["--rank", "129"], "--rank must be >= 1 and <= 128 (the LoRA kernels' limit), got 129"),
        (
            ["--resume", "latest", "--overwrite"],
            "--resume continues the run in --output, --overwrite replaces it",
        ),
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flags, message):
    code, lines = run_cli(capsys, train_argv(tmp_path / "out", *flags))
    assert code == 2 and message in one_error(lines)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "yaml, message",
    [
        ("targets: 5\n", "targets: expected a list of names (or one comma-separated string), got 5"),
        ("data: {a: 1}\n", "data: expected a string, got {'a': 1}"),
        ('gradient_checkpointing: "false"\n', "gradient_checkpointing: expected true or false, got 'false'"),
        ("steps: 2.9\n", "steps: expected an integer, got 2.9"),
        ("rank: true\n", "rank: expected an integer, got True"),
        ("rank: 4\nrank: 8\n", "key 'rank' appears twice (line 2)"),
    ],
)
def test_bad_yaml_is_one_line_naming_file_and_key(tmp_path, capsys, yaml, message):
    config = tmp_path / "run.yaml"
    config.write_text(yaml)
    argv = ["train", "--config", config, "--output", tmp_path / "out"]
    code, lines = run_cli(capsys, argv)
    assert code == 2 and message in one_error(lines) and f"--config {config}: " in one_error(lines)


def test_a_base_model_missing_a_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_base(), base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["conv_norm_out.weight"]
    save_file(tensors, str(weights))
    code, lines = run_cli(capsys, train_argv(tmp_path / "out", "--base", base))
    assert code == 2
    assert one_error(lines).endswith(
        f"--base {base}: the weights in unet/ lack 1 tensor(s) the model needs (e.g. conv_norm_out.weight); "
        "the file is incomplete or belongs to another model"
    )


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A real adapter file (one step), for the eval cases that get past the adapter."""
    import cat_engine.cat.train as train_mod
    from cat_engine.cat.config import TrainConfig

    config = TrainConfig(base=tiny_base(), rank=4, batch_size=1, steps=1, save_every=0, device="cpu")
    config.output = str(tmp_path_factory.mktemp("adapter") / "run")
    return train_mod.train(config.validate(), progress=False)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "header too small"),
        (b"garbage" * 40, "header too large"),
        ("truncated", "incomplete metadata, file not fully covered"),
    ],
)
def test_eval_with_a_broken_lora_file(tmp_path, capsys, adapter, content, reason):
    lora = tmp_path / "broken.safetensors"
    lora.write_bytes(adapter.read_bytes()[:-100] if content == "truncated" else content)
    argv = ["eval", "--lora", lora, "--output", tmp_path / "kps", "--seeds", "1", "--steps", "1"]
    code, lines = run_cli(capsys, argv)
    assert code == 2
    assert one_error(lines).startswith(
        f"cat-engine eval: error: --lora {lora}: not a readable safetensors adapter ("
    )
    assert reason in one_error(lines) and not (tmp_path / "kps").exists()


def test_eval_refuses_a_clip_folder_with_pickle_weights_only(tmp_path, capsys, adapter):
    from cat_engine.engine.builtin_clip import builtin_clip_dir

    clip = tmp_path / "clip"
    shutil.copytree(builtin_clip_dir(0), clip)
    for weights in clip.glob("*.safetensors"):
        weights.rename(weights.with_name("pytorch_model.bin"))  # never opened: the name is enough
    argv = [
        "eval",
        "--lora",
        adapter,
        "--output",
        tmp_path / "kps",
        "--clip",
        clip,
        "--seeds",
        "1",
        "--steps",
        "1",
    ]
    argv += ["--resolution", "32"]
    code, lines = run_cli(capsys, argv)
    assert code == 2
    assert one_error(lines) == (
        f"cat-engine eval: error: --clip {clip}: only pickle weights (pytorch_model.bin); the engine reads "
        "safetensors only (a pickle can run code): convert them, e.g. with transformers' save_pretrained"
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"cat-engine {__version__}"
