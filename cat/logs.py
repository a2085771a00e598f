"""The commands' log output: every message of the ``cat_engine`` loggers as one line on stderr,
``cat-engine: LEVEL: message``, written above any progress bar (``tqdm.contrib.logging``).

Library code only logs (skipped images, config changes on resume...); a command wraps its work in
:func:`console_logging` to show those messages.
"""

from __future__ import annotations

import contextlib
import logging
import sys

log = logging.getLogger("cat_engine")


@contextlib.contextmanager
def console_logging(level: int = logging.INFO):
    """Show the ``cat_engine`` messages of ``level`` and above on stderr while the block runs."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_lowercase_level)
    handler.setFormatter(logging.Formatter("cat-engine: %(level)s: %(message)s"))
    saved = log.handlers[:], log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False  # not again through the root logger's handlers
    try:
        with logging_redirect_tqdm(loggers=[log], tqdm_class=tqdm):
            yield
    finally:
        log.handlers, log.propagate = saved[0], saved[2]
        log.setLevel(saved[1])


def _lowercase_level(record: logging.LogRecord) -> bool:
    record.level = record.levelname.lower()
    return True
