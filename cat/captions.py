"""Token and plain captions (docs/design.md §1).

The token caption carries the trigger token (``a photo of sks dog``). The plain caption, used
by the CAT term, is the same caption "without the trigger token", in one of three readings:

- ``class`` (default): the token is replaced by the class word, without doubling it
  (``a photo of sks dog`` and ``a photo of sks`` both give ``a photo of dog``);
- ``strip``: the token is removed (``a photo of sks dog`` gives ``a photo of dog``,
  ``a photo of sks`` gives ``a photo of``);
- ``empty``: the empty prompt.
"""

from __future__ import annotations

import re

PLAIN_MODES = ("class", "strip", "empty")
DEFAULT_CAPTION_TEMPLATE = "a photo of {token} {class_word}"


def _token_pattern(token: str) -> re.Pattern:
    # Whole-word match, so a token "sks" does not hit "sksx" or "asks".
    return re.compile(r"(?<![\w])" + re.escape(token) + r"(?![\w])")


def has_token(caption: str, token: str) -> bool:
    """True when ``token`` appears in ``caption`` as a whole word."""
    return bool(_token_pattern(token).search(caption))


def token_span(caption: str, token: str) -> tuple[int, int] | None:
    """The character span of ``token``'s first whole-word occurrence in ``caption``, or ``None``."""
    match = _token_pattern(token).search(caption)
    return match.span() if match else None


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return text.lstrip(",;: ")  # "sks, on the beach" stripped of its token starts with the comma


def plain_caption(caption: str, token: str, class_word: str, mode: str = "class") -> str:
    """Return the caption without the trigger token, following ``mode`` (see module docstring)."""
    if mode not in PLAIN_MODES:
        raise ValueError(f"plain mode must be one of {', '.join(PLAIN_MODES)}, got {mode!r}")
    if mode == "empty":
        return ""
    pattern = _token_pattern(token)
    if mode == "strip":
        return _tidy(pattern.sub(" ", caption))
    # class: "sks dog" -> "dog" (the class word already follows), bare "sks" -> "dog".
    followed_by_class = re.compile(
        r"(?<![\w])" + re.escape(token) + r"\s+(?=" + re.escape(class_word) + r"(?![\w]))"
    )
    caption = followed_by_class.sub("", caption)
    return _tidy(pattern.sub(class_word, caption))


def token_caption(template: str, token: str, class_word: str) -> str:
    """Fill a caption template such as ``a photo of {token} {class_word}``."""
    try:
        return _tidy(template.format(token=token, class_word=class_word))
    except (KeyError, IndexError) as exc:
        raise ValueError(
            f"caption template {template!r} may only use {{token}} and {{class_word}} (found {exc})"
        ) from None
