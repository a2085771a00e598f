"""cat/token_limit.py: an image whose trigger token the text encoder would cut off is named."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cat_engine.cat import data as data_mod
from cat_engine.cat.config import TrainConfig
from cat_engine.cat.token_limit import tokens_through_trigger
from cat_engine.engine.builtin import clip_tokenizer


def test_the_count_matches_what_the_encoder_keeps():
    tokenizer = clip_tokenizer()
    token_id = tokenizer("sks", add_special_tokens=False).input_ids
    for words in (70, 74, 75, 80):
        caption = " ".join(["a"] * words) + " sks star"
        kept = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
        needed = tokens_through_trigger(tokenizer, caption, "sks")
        assert (needed <= 76) == (token_id[0] in kept), words  # the 77th place is the end token
    assert tokens_through_trigger(tokenizer, "a photo of a star", "sks") is None


def test_an_image_whose_token_is_cut_off_gets_a_warning_naming_it(tmp_path, caplog):
    for name, caption in [("short", "a photo of sks star"), ("long", "a very " * 40 + "photo of sks star")]:
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    config = TrainConfig(data=str(tmp_path)).validate()
    with caplog.at_level("WARNING", logger="cat_engine"):
        data_mod.load_training_images(config, 16, [clip_tokenizer()])
    warnings = [r.getMessage() for r in caplog.records if "past the text encoder's limit" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(str(tmp_path / "long.png"))
    assert (
        "the trigger token 'sks' is at token 84 of its caption, past the text encoder's limit of 77"
        in warnings[0]
    )
