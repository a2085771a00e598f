from cat_engine.engine.builtin import clip_tokenizer


def test_shipped_clip_tokenizer_is_the_real_clip_bpe():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # docs/design.md §8
    assert tok("a photo of sks star", padding="max_length", max_length=77).input_ids[-1] == 49407
