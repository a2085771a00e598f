"""Several concepts in one adapter: each image's captions use its own concept's token and class word."""

import argparse

import numpy as np
import pytest
from PIL import Image

import cat_engine.cat.data as data_mod
import cat_engine.cat.train as train_mod
from cat_engine.cat.config import ConfigError, TrainConfig, build_config, config_from_args, load_yaml
from cat_engine.engine.lora import read_lora_metadata


def random_base() -> str:
    from cat_engine.engine import builtin

    try:
        return str(builtin.builtin_model_dir(pretrained=False))
    except TypeError:  # a version without the pretrained toy world
        return str(builtin.builtin_model_dir())


def _concept(folder, colour, captions):
    """A folder of 16 px images; ``captions[i]`` is written to a .txt, or None for the template."""
    folder.mkdir()
    for i, caption in enumerate(captions):
        Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(folder / f"{i}.png")
        if caption is not None:
            (folder / f"{i}.txt").write_text(caption)
    return str(folder)


@pytest.fixture
def two_concepts(tmp_path):
    bug = _concept(tmp_path / "bug", (200, 30, 30), ["a photo of zwx bug on a leaf", None])
    fish = _concept(tmp_path / "fish", (30, 30, 200), [None, "qlp fish in the sea", None])
    return [
        {"data": bug, "token": "zwx", "class_word": "bug"},
        {
            "data": fish,
            "token": "qlp",
            "class_word": "fish",
            "caption_template": "a picture of {token} {class_word}",
        },
    ]


def test_captions_and_plain_captions_follow_each_concept(two_concepts):
    config = TrainConfig(concepts=two_concepts).validate()
    images = data_mod.load_training_images(config, resolution=16)
    assert images.pixels.shape == (5, 3, 16, 16)
    assert images.concept_index == [0, 0, 1, 1, 1]
    assert images.captions == [
        "a photo of zwx bug on a leaf",
        "a photo of zwx bug",  # the global default template, with this concept's token
        "a picture of qlp fish",  # this concept's own template
        "qlp fish in the sea",
        "a picture of qlp fish",
    ]
    # The CAT term's caption of each row: its own token replaced by its own class word.
    assert images.plain_captions == [
        "a photo of bug on a leaf",
        "a photo of bug",
        "a picture of fish",
        "fish in the sea",
        "a picture of fish",
    ]
    strip = data_mod.load_training_images(
        TrainConfig(concepts=two_concepts, plain_mode="strip").validate(), 16
    )
    assert strip.plain_captions[3] == "fish in the sea" and strip.plain_captions[1] == "a photo of bug"


def test_cached_rows_point_at_their_own_captions_and_batches_mix(two_concepts, tmp_path):
    from cat_engine.engine.models import load_base

    config = TrainConfig(concepts=two_concepts, batch_size=2).validate()
    model = load_base(random_base())
    data = data_mod.prepare_data(config, model, 16, "cpu")
    images = data_mod.load_training_images(config, 16)
    texts = data.texts
    assert [texts.captions[i] for i in texts.token_index] == images.captions
    assert [texts.captions[i] for i in texts.plain_index] == images.plain_captions
    assert data.concept_index == [0, 0, 1, 1, 1]
    # One epoch of the shuffled stream draws from both concepts.
    drawn = [i for step in range(3) for i in data_mod.sample_indices(step, 2, len(data), config.seed)]
    assert {data.concept_index[i] for i in drawn[:5]} == {0, 1}


def test_multi_concept_training_writes_every_token_in_the_metadata(two_concepts, tmp_path):
    config = TrainConfig(
        base=random_base(),
        concepts=two_concepts,
        rank=4,
        steps=2,
        batch_size=2,
        save_every=0,
        resolution=16,
        output=str(tmp_path / "out"),
    ).validate()
    meta = read_lora_metadata(train_mod.train(config, progress=False))
    assert meta["concepts"] == [{"token": "zwx", "class_word": "bug"}, {"token": "qlp", "class_word": "fish"}]
    assert meta["token"] == "zwx"  # the first concept stays the default of cat-engine eval


def test_concepts_from_yaml_and_from_flags(two_concepts, tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(
        "concepts:\n"
        f"  - {{data: {two_concepts[0]['data']}, token: zwx, class-word: bug}}\n"
        f"  - {{data: {two_concepts[1]['data']}, token: qlp, class_word: fish}}\n"
    )
    config = build_config(load_yaml(file), {})
    assert [c["token"] for c in config.concepts] == ["zwx", "qlp"]
    assert config.concepts[0]["caption_template"] == config.caption_template

    parser = argparse.ArgumentParser()
    train_mod.add_arguments(parser)
    args = parser.parse_args(["--concept", "x:/data/bug:zwx:bug", "--concept", "fish:qlp:fish"])
    config = config_from_args(args)
    assert config.concepts[0] == {
        "data": "x:/data/bug",
        "token": "zwx",
        "class_word": "bug",
        "caption_template": config.caption_template,
    }


@pytest.mark.parametrize(
    "concepts, data, message",
    [
        (
            [
                {"data": "a", "token": "sks", "class_word": "dog"},
                {"data": "b", "token": "sks", "class_word": "cat"},
            ],
            None,
            "token 'sks' is used by more than one concept",
        ),
        ([{"data": "a", "token": "sks"}], None, r"concepts\[0\]: missing class_word"),
        ([{"data": "a", "token": "sks", "class_word": "dog", "colour": "red"}], None, "unknown key 'colour'"),
        ([{"data": "a", "token": "sks", "class_word": "dog"}], "b", "either as --data or as concepts"),
        ([], None, "non-empty list"),
    ],
)
def test_bad_concepts_are_one_clear_error(concepts, data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(concepts=concepts, data=data).validate()
