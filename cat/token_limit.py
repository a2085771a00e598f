"""Captions whose trigger token the text encoder never sees.

A CLIP text encoder reads a fixed number of tokens (77 with the start and end tokens; a T5 beside it
reads more); the rest of a longer caption is cut off. When the trigger token falls past the cut, its image trains as if it had
no token, which silently weakens the concept; :func:`warn_tokens_past_limit` names such images.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cat_engine.cat.captions import token_span

log = logging.getLogger("cat_engine")
# Tokenizers without a limit report a huge model_max_length: nothing is cut there.
NO_LIMIT = 100_000


def tokens_through_trigger(tokenizer, caption: str, token: str) -> int | None:
    """How many text tokens the encoder must read to have read all of ``token`` (its first
    occurrence as a word, counting the start token), or ``None`` when it is not in ``caption``."""
    span = token_span(caption, token)
    if span is None:
        return None
    ids = tokenizer(caption[: span[1]], add_special_tokens=False, truncation=False, verbose=False).input_ids
    return len(ids) + 1


def warn_tokens_past_limit(tokenizers, captions: list[str], files: list[Path], token: str) -> list[Path]:
    """Warn, once per image, when a caption's ``token`` lies past a text encoder's token limit;
    return those images. ``captions[i]`` is the caption of ``files[i]``."""
    past = []
    limits = sorted({t.model_max_length for t in tokenizers if t.model_max_length < NO_LIMIT})
    if not limits:
        return past
    # the longest reader decides: with a T5 beside CLIP (SD3, Flux) the token is lost only past T5's limit
    tokenizer, limit = next(t for t in tokenizers if t.model_max_length == limits[-1]), limits[-1]
    needed_by_caption: dict[str, int | None] = {}
    for caption, file in zip(captions, files):
        if caption not in needed_by_caption:
            needed_by_caption[caption] = tokens_through_trigger(tokenizer, caption, token)
        needed = needed_by_caption[caption]
        if needed is not None and needed > limit - 1 and file not in past:  # the last place is the end token
            past.append(file)
            log.warning(
                "%s: the trigger token %r is at token %d of its caption, past the text encoder's limit of %d: "
                "it is cut off and the image trains without it; shorten the caption or move the token forward",
                *(file, token, needed, limit),
            )
    return past
