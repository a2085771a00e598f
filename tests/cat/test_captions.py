import pytest

from cat_engine.cat.captions import has_token, plain_caption, token_caption


@pytest.mark.parametrize(
    "caption, mode, expected",
    [
        ("a photo of sks dog", "class", "a photo of dog"),
        ("a photo of sks", "class", "a photo of dog"),  # bare token: replaced, not dropped
        ("sks dog on the beach, sunny", "class", "dog on the beach, sunny"),
        ("a sks dog next to another sks dog", "class", "a dog next to another dog"),
        ("a photo of sks dog", "strip", "a photo of dog"),
        ("a photo of sks", "strip", "a photo of"),
        ("sks, on the beach", "strip", "on the beach"),
        ("a photo of sks dog", "empty", ""),
        ("a photo of asks dog", "class", "a photo of asks dog"),  # whole words only
    ],
)
def test_plain_caption_modes(caption, mode, expected):
    assert plain_caption(caption, "sks", "dog", mode) == expected


def test_class_word_is_not_doubled_even_with_extra_spaces():
    assert plain_caption("a photo of  sks   dog", "sks", "dog", "class") == "a photo of dog"


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="plain mode must be one of"):
        plain_caption("a photo of sks dog", "sks", "dog", "nope")


def test_token_caption_template():
    assert token_caption("a photo of {token} {class_word}", "sks", "dog") == "a photo of sks dog"
    with pytest.raises(ValueError, match="caption template"):
        token_caption("a photo of {who}", "sks", "dog")


def test_has_token():
    assert has_token("a photo of sks dog", "sks")
    assert not has_token("a photo of sksdog", "sks")
