"""What a training run writes: the LoRA files of ``--save-format`` in the output and in every
checkpoint (loadable after an interrupt), and a bf16 run on the CPU with the built-in model."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.engine.checkpoint import CHECKPOINTS, LORA_FILE
from cat_engine.engine.lora import LORA_WEIGHT_NAME, read_lora_metadata

FAST = dict(rank=4, steps=2, save_every=1, batch_size=2, lr=1e-3, alpha=8)


def _train(tmp_path, name, **overrides):
    from cat_engine.engine.builtin import builtin_model_dir

    options = {**FAST, "base": str(builtin_model_dir(pretrained=False)), **overrides}
    config = TrainConfig(output=str(tmp_path / name), **options).validate()
    return train_mod.train(config, progress=False)


def _same_adapter(peft_file, kohya_file):
    """The kohya file holds the diffusers file's tensors (lora_A = lora_down, lora_B = lora_up)."""
    peft, kohya = load_file(str(peft_file)), load_file(str(kohya_file))
    downs = sorted(v.flatten().tolist()[:3] for k, v in kohya.items() if k.endswith("lora_down.weight"))
    a = sorted(v.flatten().tolist()[:3] for k, v in peft.items() if k.endswith("lora_A.weight"))
    assert downs == a and len(downs) > 0
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}


def test_both_formats_in_the_output_and_in_every_checkpoint(tmp_path):
    path = _train(tmp_path, "my-run")
    out = tmp_path / "my-run"
    assert path == out / LORA_WEIGHT_NAME
    _same_adapter(out / LORA_WEIGHT_NAME, out / "my-run.safetensors")
    for step in (1, 2):
        folder = out / CHECKPOINTS / f"step-{step}"
        _same_adapter(folder / LORA_WEIGHT_NAME, folder / "my-run.safetensors")
        assert read_lora_metadata(folder / "my-run.safetensors")["steps"] == step
        # the checkpoint's loadable file holds the checkpoint's own LoRA tensors
        state, saved = load_file(str(folder / LORA_WEIGHT_NAME)), load_file(str(folder / LORA_FILE))
        assert sorted(k.removeprefix("unet.") for k in state) == sorted(
            k.replace(".default", "") for k in saved
        )
        for key, value in saved.items():
            assert torch.equal(state["unet." + key.replace(".default", "")], value), key
    final = load_file(str(out / LORA_WEIGHT_NAME))
    at_two = load_file(str(out / CHECKPOINTS / "step-2" / LORA_WEIGHT_NAME))
    assert all(torch.equal(final[k], at_two[k]) for k in final)


def test_kohya_format_alone(tmp_path):
    path = _train(tmp_path, "k", steps=1, save_every=0, save_format="kohya")
    assert path == tmp_path / "k" / "k.safetensors"
    assert not (tmp_path / "k" / LORA_WEIGHT_NAME).exists()
    assert sorted(p.name for p in (tmp_path / "k" / CHECKPOINTS / "step-1").glob("*.safetensors")) == [
        "k.safetensors",
        LORA_FILE,
        "optimizer.safetensors",
        "rng.safetensors",
    ]
    with pytest.raises(ConfigError, match="--save-format must be one of diffusers, kohya, both"):
        TrainConfig.from_dict({"save_format": "ckpt"})


def test_bf16_on_cpu_trains_the_builtin_model(tmp_path):
    """The built-in UNet's text-embedding LayerNorm reads the fp32 text embeddings first thing."""
    result = subprocess.run(
        [sys.executable, "-m", "cat_engine", "train", "--precision", "bf16", "--device", "cpu"]
        + ["--steps", "2", "--rank", "4", "--save-every", "0", "--output", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory plan: bf16" in result.stderr
    weights = load_file(str(tmp_path / "out" / LORA_WEIGHT_NAME))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert max(v.abs().max().item() for k, v in weights.items() if "lora_B" in k) > 0, "it trained"
