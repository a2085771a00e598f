"""``cat-engine train --manifest``: one adapter per concept, sharded over torchrun ranks, summary and KPS."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cat_engine.cat.train as train_mod
from cat_engine.cat import manifest as farm
from cat_engine.cat.config import ConfigError
from cat_engine.engine.lora import LORA_WEIGHT_NAME, read_lora_metadata


def random_base() -> str:
    from cat_engine.engine import builtin

    try:
        return str(builtin.builtin_model_dir(pretrained=False))
    except TypeError:  # a version without the pretrained toy world
        return str(builtin.builtin_model_dir())


def _images(folder, colour, n=2):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), [c + 10 * i for c in colour], np.uint8)).save(
            folder / f"{i}.png"
        )


def _args(*argv):
    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    return parser.parse_args(list(argv))


MANIFEST = """
output: farm
defaults: {{rank: 4, steps: 3, save_every: 0, batch_size: 2, base: {base}, device: cpu}}
kps: {{seeds: 1, steps: 2, clip: builtin-tiny-clip-random, prompts: ["a photo of {{}}"]}}
concepts:
  - {{name: bug, data: data/bug, token: zwx, class_word: bug, lr: 0.001}}
  - {{data: data/fish, token: qlp, class_word: fish}}
"""


@pytest.fixture
def manifest_file(tmp_path):
    _images(tmp_path / "data" / "bug", (200, 30, 30))
    _images(tmp_path / "data" / "fish", (30, 30, 200))
    path = tmp_path / "concepts.yaml"
    path.write_text(MANIFEST.format(base=random_base()))
    return path


def test_manifest_options_layer_and_folders_resolve(manifest_file, tmp_path):
    root, configs = farm.farm_configs(_args("--steps", "7"), farm.read_manifest(manifest_file))
    assert root.name == "farm"
    (bug_name, bug), (fish_name, fish) = configs
    assert (bug_name, fish_name) == ("bug", "qlp-fish")
    assert bug.data == str(tmp_path / "data" / "bug") and bug.output == str(root / "bug")
    assert bug.lr == 0.001 and fish.lr == 1e-4  # a concept's own option; the default elsewhere
    assert bug.rank == fish.rank == 4  # the manifest's defaults
    assert bug.steps == fish.steps == 7  # a command-line flag overrides the manifest


@pytest.mark.parametrize(
    "text, argv, message",
    [
        ("concepts: [{data: a, token: x, class_word: y, colour: red}]", [], "unknown option 'colour'"),
        ("concepts: [{data: a, token: x, class_word: y}]\nextra: 1", [], "unknown key 'extra'"),
        ("concepts: [{data: a}, {data: b}]", [], "concept name 'sks-star' repeated"),
        ("concepts: [{data: a, token: x, class_word: y, steps: 0}]", [], "concept x-y: --steps must be >= 1"),
        ("concepts: [{data: a, token: x, class_word: y}]", ["--token", "z"], "--token cannot be combined"),
        ("kps: {seeds: 1, colour: red}\nconcepts: [{data: a}]", [], "kps: unknown option 'colour'"),
        # a concept's folder must be one folder name inside the farm's folder
        ("concepts: [{name: '..', data: a}]", [], r"concept name '\.\.' is not a folder name inside"),
        ("concepts: [{name: '.', data: a}]", [], r"concept name '\.' is not a folder name"),
        ("concepts: [{name: /tmp/x, data: a}]", [], r"concept name '/tmp/x' is not a folder name"),
        ("concepts: [{name: a/../../b, data: a}]", [], r"concept name 'a/\.\./\.\./b' is not"),
        ("concepts: [{token: ../x, data: a}]", [], r"concept name '\.\./x-star' is not"),
        ("concepts: [{name: summary.json, data: a}]", [], r"is the farm's summary file"),
        ("concepts: [{name: a, data: a, rank: 2.5}]", [], r"concepts\[0\] \(a\): rank: expected an integer"),
        ("concepts: [{name: a, data: a}, {name: a, data: b}]", [], r"concept name 'a' repeated"),
        ("concepts:\n  - name: a\n    name: b\n", [], r"key 'name' appears twice"),
    ],
)
def test_bad_manifest_is_one_clear_error(tmp_path, text, argv, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        farm.farm_configs(_args(*argv), farm.read_manifest(path))


@pytest.mark.slow
def test_manifest_on_two_ranks_trains_each_concept_once_with_kps_and_summary(manifest_file, tmp_path):
    from cat_engine.cat.clip import resolve_clip

    # Written once here: the ranks would otherwise both write the random CLIP into the same cache.
    assert (resolve_clip("builtin-tiny-clip-random")[0] / "config.json").is_file()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "cat_engine", "train", "--manifest", str(manifest_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    root = tmp_path / "farm"  # relative to the working folder, like --output
    summary = json.loads((root / farm.SUMMARY_FILE).read_text())
    rows = summary["concepts"]
    assert summary["ranks"] == 2
    assert [(r["concept"], r["rank"], r["steps"]) for r in rows] == [("bug", 0, 3), ("qlp-fish", 1, 3)]
    for row in rows:
        assert "error" not in row
        assert 0 <= row["kps"] <= 1 and isinstance(row["ldm"], float)
        assert (root / row["concept"] / farm.KPS_FOLDER / "kps.json").is_file()
        assert (root / row["concept"] / farm.KPS_FOLDER / "grid.png").is_file()
    assert read_lora_metadata(root / "bug" / LORA_WEIGHT_NAME)["token"] == "zwx"
    assert read_lora_metadata(root / "qlp-fish" / LORA_WEIGHT_NAME)["class_word"] == "fish"
    # The table is printed once (rank 0), one line per concept under the header.
    table = [line for line in result.stdout.splitlines() if line.startswith(("concept", "bug", "qlp-fish"))]
    assert len(table) == 3, result.stdout


def test_kps_options_become_the_eval_config_of_each_concept(manifest_file, tmp_path):
    _, configs = farm.farm_configs(_args(), farm.read_manifest(manifest_file))
    bug = configs[0][1]
    kps = {"seeds": 1, "steps": 2, "guidance": 5, "prompts": ["a photo of {}"]}
    config = farm.kps_config(bug, kps, tmp_path / "lora.safetensors").validate()
    assert (config.refs, config.token, config.class_word) == (bug.data, "zwx", "bug")
    assert config.templates == ["a photo of {}"] and config.guidance == 5.0 and config.seeds == 1
    (tmp_path / "prompts.txt").write_text("{} in the snow\n")
    config = farm.kps_config(bug, {"prompts": str(tmp_path / "prompts.txt")}, tmp_path / "lora")
    assert config.templates == ["{} in the snow"] and config.base == bug.base
