"""Caption dropout and tag shuffling, with the CAT pair kept consistent.

Each step may change a row's token caption: ``--caption-dropout`` replaces it by the empty caption,
``--shuffle-caption`` shuffles its comma-separated tags (the first ``--keep-tokens`` stay in
place). The row's plain caption is then derived from the caption actually used, by the same rule
as the cached ones (``captions.plain_caption``), so the CAT term always compares the adapter and the
base model on the plain form of the caption the LDM term saw.

The random draws come from the step's generator, after the noise and timesteps, and only for the
options that are on: without them the generator's stream is what it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cat_engine.cat.captions import plain_caption

TAG_SEPARATOR = ","


@dataclass(frozen=True)
class CaptionOptions:
    dropout: float = 0.0  # probability that a row's caption is the empty one
    shuffle: bool = False  # shuffle each caption's comma-separated tags
    keep_tokens: int = 0  # leading tags that stay in place when shuffling

    @property
    def active(self) -> bool:
        return self.dropout > 0 or self.shuffle


def shuffle_tags(caption: str, order: list[int], keep: int = 0) -> str:
    """``caption``'s tags after the first ``keep`` reordered by ``order`` (a permutation of them)."""
    tags = [t.strip() for t in caption.split(TAG_SEPARATOR)]
    fixed, rest = tags[:keep], tags[keep:]
    return f"{TAG_SEPARATOR} ".join(fixed + [rest[i] for i in order])


def tag_count(caption: str, keep: int = 0) -> int:
    """How many tags of ``caption`` :func:`shuffle_tags` reorders."""
    return max(0, len(caption.split(TAG_SEPARATOR)) - keep)


@dataclass(frozen=True)
class Concept:
    """What a row's plain caption is made with."""

    token: str
    class_word: str
    plain_mode: str

    def plain(self, caption: str) -> str:
        return plain_caption(caption, self.token, self.class_word, self.plain_mode)


def step_captions(
    captions: list[str], concepts: list[Concept], options: CaptionOptions, generator: torch.Generator
) -> tuple[list[str], list[str]]:
    """The token and plain captions a step uses for rows whose cached captions are ``captions``.

    ``concepts[i]`` belongs to row ``i``. Draws, in order: one uniform number per row (dropout),
    then one permutation per row (shuffle); each only when its option is on.
    """
    used = list(captions)
    if options.dropout > 0:
        dropped = torch.rand(len(used), generator=generator) < options.dropout
        used = ["" if d else c for c, d in zip(used, dropped.tolist())]
    if options.shuffle:
        orders = [torch.randperm(tag_count(c, options.keep_tokens), generator=generator) for c in used]
        used = [
            c if not c else shuffle_tags(c, o.tolist(), options.keep_tokens) for c, o in zip(used, orders)
        ]
    return used, [concept.plain(c) if c else "" for c, concept in zip(used, concepts)]
