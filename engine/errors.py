"""The one base class of every error a user can fix.

Library code raises a subclass of :class:`CatEngineError` (a bad option, a folder that is not a
model, a checkpoint that cannot be read, a plan that cannot run here) with a message that names
the file or option and the problem. Only the command line (``cat_engine/cli.py``) turns it into a
one-line message and an exit code; library callers catch it like any ``ValueError``.
"""

from __future__ import annotations


class CatEngineError(ValueError):
    """Something the user can fix; the message is one line that names the file or option."""
