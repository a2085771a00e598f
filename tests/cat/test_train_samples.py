"""Sample grids during training: the prompts, the grid, rank 0 only, and a run with samples trains
bit-identically to one without."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.cat.grid import HEADER, LABEL_WIDTH, MIN_CELL
from cat_engine.cat.train_samples import read_prompts, sample_pairs
from cat_engine.engine import distributed as dist
from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.checkpoint import CHECKPOINTS, RNG_FILE

FAST = dict(rank=4, steps=4, batch_size=2, lr=1e-3, save_every=0, sample_steps=2)


def _config(tmp_path, name, **overrides):
    base = str(builtin_model_dir(pretrained=False))
    return TrainConfig(base=base, output=str(tmp_path / name), **{**FAST, **overrides}).validate()


def test_prompts_from_a_file_a_list_or_bars(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("sks star on the beach\n\n  a painting of sks star  \n")
    assert read_prompts(str(file)) == ["sks star on the beach", "a painting of sks star"]
    assert read_prompts("sks star | sks star, in the snow") == ["sks star", "sks star, in the snow"]
    assert read_prompts(["a", " b "]) == ["a", "b"]
    with pytest.raises(ConfigError, match="missing.txt: cannot read it"):
        read_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="no prompt in it"):
        read_prompts(" | ")


def test_each_prompt_is_paired_with_its_plain_form():
    concepts = [
        {"token": "sks", "class_word": "star", "caption_template": "a photo of {token} {class_word}"},
        {"token": "ohwx", "class_word": "fish", "caption_template": "{token} {class_word} swimming"},
    ]
    config = TrainConfig().validate()
    assert sample_pairs(config, concepts) == [
        ("a photo of sks star", "a photo of star"),
        ("ohwx fish swimming", "fish swimming"),
    ]
    config = TrainConfig(sample_prompts="ohwx in the snow|a fish", plain_mode="strip").validate()
    assert sample_pairs(config, concepts) == [("ohwx in the snow", "in the snow"), ("a fish", "a fish")]


def test_a_run_with_samples_trains_bit_identically_to_one_without(tmp_path):
    plain = train_mod.train(_config(tmp_path, "plain"), progress=False)
    sampled = train_mod.train(
        _config(
            tmp_path, "sampled", sample_every=2, sample_seeds=3, sample_prompts="sks star|sks star, small"
        ),
        progress=False,
    )
    a, b = load_file(str(plain)), load_file(str(sampled))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rng = [load_file(str(tmp_path / n / CHECKPOINTS / "step-4" / RNG_FILE)) for n in ("plain", "sampled")]
    assert all(torch.equal(rng[0][k], rng[1][k]) for k in rng[0])  # the global RNG states too
    folder = tmp_path / "sampled" / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["step-2.png", "step-4.png"]
    grid = Image.open(folder / "step-4.png")
    # 2 prompts x (token, plain, base) rows, 3 seed columns, 64 px cells enlarged to 128
    assert grid.size == (LABEL_WIDTH + 3 * MIN_CELL, HEADER + 6 * MIN_CELL)
    assert not (tmp_path / "plain" / "samples").exists()


def test_only_rank_0_samples_and_tracks(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "data_parallel", lambda step, ranks, device: step)  # no process group here
    config = _config(tmp_path, "rank1", sample_every=1, log_with="tensorboard", batch_size=2)
    # build: the part of setup after the output folder is claimed (which needs the process group)
    trainer = train_mod.Trainer.build(config, dist.DistContext(rank=1, world=2), resume_from=None)
    assert trainer.samples is None and type(trainer.tracker).__name__ == "Tracker"
    assert not (tmp_path / "rank1" / "logs").exists()
