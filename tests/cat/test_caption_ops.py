"""Caption dropout and tag shuffling keep each row's CAT pair consistent: the plain caption is the
plain form of the caption actually used."""

from __future__ import annotations

import torch

from cat_engine.cat.caption_ops import CaptionOptions, Concept, shuffle_tags, step_captions, tag_count

CONCEPT = Concept("sks", "dog", "class")
CAPTION = "a photo of sks dog, on the beach, smiling, golden hour"


def test_shuffle_keeps_the_leading_tags_and_every_tag():
    assert shuffle_tags("a, b,c , d", [2, 0, 1], keep=1) == "a, d, b, c"
    assert tag_count("a, b, c", keep=1) == 2 and tag_count("a", keep=3) == 0
    assert shuffle_tags("no tags here", [0]) == "no tags here"


def test_pairs_stay_consistent_under_dropout_and_shuffling():
    options = CaptionOptions(dropout=0.4, shuffle=True, keep_tokens=1)
    generator = torch.Generator().manual_seed(0)
    dropped = kept = 0
    for _ in range(50):
        token, plain = step_captions([CAPTION] * 4, [CONCEPT] * 4, options, generator)
        for t, p in zip(token, plain):
            if t == "":
                dropped += 1
                assert p == ""  # the empty caption's plain form is itself
                continue
            kept += 1
            tags = [x.strip() for x in t.split(",")]
            assert tags[0] == "a photo of sks dog"  # --keep-tokens 1
            assert sorted(tags) == sorted(x.strip() for x in CAPTION.split(","))
            assert p == CONCEPT.plain(t) and "sks" not in p and p.startswith("a photo of dog, ")
    assert 40 < dropped < 120 and kept > 0  # about 40% of 200


def test_the_draws_come_from_the_generator_and_only_when_on():
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    assert step_captions([CAPTION], [CONCEPT], CaptionOptions(), generator) == (
        [CAPTION],
        [CONCEPT.plain(CAPTION)],
    )
    assert torch.equal(generator.get_state(), state)  # nothing drawn without the options
    options = CaptionOptions(dropout=0.5, shuffle=True)
    first = step_captions([CAPTION] * 3, [CONCEPT] * 3, options, torch.Generator().manual_seed(7))
    again = step_captions([CAPTION] * 3, [CONCEPT] * 3, options, torch.Generator().manual_seed(7))
    assert first == again
