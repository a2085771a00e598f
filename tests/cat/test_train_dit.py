"""``cat-engine train --base builtin-tiny-<family>`` end to end on the transformer families, a KPS
eval of the result, a bit-exact resume of flow-matching training, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cat_engine.cat.train import LOG_FILE
from cat_engine.cli import main
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import LORA_WEIGHT_NAME, read_lora_metadata

FAST = ["--steps", "2", "--rank", "4", "--save-every", "0", "--device", "cpu", "--lr", "1e-3"]


def _train(tmp_path, name, *flags):
    out = tmp_path / name
    assert main(["train", "--base", f"builtin-tiny-{name}", "--output", str(out), *FAST, *flags]) == 0
    return out


@pytest.mark.parametrize("name", list(DIT_FAMILIES))
def test_train_end_to_end(tmp_path, name, capsys):
    out = _train(tmp_path, name, "--batch-size", "2")
    assert f"saved LoRA: {out / LORA_WEIGHT_NAME}" in capsys.readouterr().out
    weights = load_file(str(out / LORA_WEIGHT_NAME))
    assert weights and all(k.startswith("transformer.") for k in weights)
    meta = read_lora_metadata(out)
    assert meta["family"] == name and meta["target_modules"] == sorted(DIT_FAMILIES[name].default_targets)
    config = json.loads((out / "train_config.json").read_text())
    assert config["targets"] == list(DIT_FAMILIES[name].default_targets)  # the family's, written out
    log = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all(r["cat"] > 0 and torch.isfinite(torch.tensor(r["loss"])) for r in log[1:])


def test_vram_budget_picks_a_plan_for_a_transformer(tmp_path, capsys):
    out = _train(tmp_path, "zimage", "--vram-budget", "8GB")
    err = capsys.readouterr().err
    assert "--vram-budget 8GB: predicted peak" in err and "memory plan: bf16 sdpa no-ckpt" in err
    assert (out / LORA_WEIGHT_NAME).is_file()


def test_an_int8_base_offloaded_trains_the_same_adapter_keys(tmp_path):
    pytest.importorskip("torchao")
    plain = _train(tmp_path / "plain", "flux", "--gradient-checkpointing")
    low = _train(tmp_path / "low", "flux", "--gradient-checkpointing", "--frozen-quant", "int8", "--offload")
    want, got = load_file(str(plain / LORA_WEIGHT_NAME)), load_file(str(low / LORA_WEIGHT_NAME))
    assert want.keys() == got.keys()
    assert all(got[k].dtype == torch.float32 and torch.isfinite(got[k]).all() for k in got)
    # two steps on the same data: the int8 base moves the adapter (lora_B starts at zero) the way
    # the full-precision base does, up to the quantisation's error
    b_keys = [k for k in got if "lora_B" in k]
    cosine = torch.nn.functional.cosine_similarity(
        torch.cat([got[k].flatten() for k in b_keys]), torch.cat([want[k].flatten() for k in b_keys]), dim=0
    )
    assert cosine > 0.9
    config = json.loads((low / "train_config.json").read_text())
    assert config["frozen_quant"] == "int8" and config["offload"] is True


def test_eval_of_a_flux_adapter(tmp_path, capsys):
    out = _train(tmp_path, "flux", "--gradient-checkpointing")
    report = tmp_path / "kps"
    assert (
        main(
            [
                "eval",
                "--lora",
                str(out),
                "--output",
                str(report),
                "--seeds",
                "1",
                "--steps",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    kps = json.loads((report / "kps.json").read_text())
    assert kps["model"]["family"] == "flux"
    assert kps["sampling"]["scheduler"] == "FlowMatchEulerDiscrete"
    assert kps["sampling"]["guidance"] == DIT_FAMILIES["flux"].sample_guidance
    assert (report / "grid.png").is_file()


def test_flow_matching_resume_is_bit_exact(tmp_path):
    flags = ["--steps", "4", "--batch-size", "2"]
    straight = load_file(str(_train(tmp_path, "sd3", *flags) / LORA_WEIGHT_NAME))
    _train(tmp_path / "split", "sd3", "--steps", "2", "--batch-size", "2")
    resumed = _train(tmp_path / "split", "sd3", *flags, "--resume", "latest")
    resumed = load_file(str(resumed / LORA_WEIGHT_NAME))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("flux", ["--offload"], "--offload needs --gradient-checkpointing"),
        ("flux", ["--frozen-quant", "int4"], "--frozen-quant must be one of none, int8, fp8"),
        ("sd3", ["--attention", "math"], "--attention math: SD3 runs its own attention processors"),
        ("zimage", ["--targets", "to_q,all_x_embedder.2-1"], "all_x_embedder"),
    ],
)
def test_one_line_errors(tmp_path, capsys, name, flags, message):
    args = ["train", "--base", f"builtin-tiny-{name}", "--output", str(tmp_path / "out"), *FAST, *flags]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], errors
