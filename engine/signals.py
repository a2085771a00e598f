"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (schedulers, ``kill``) at a step boundary (docs/design.md §10).

While a loop runs inside :meth:`StopRequest.deferred`, the first signal only records the request:
the loop finishes the step in progress, writes a consistent checkpoint and raises
:class:`Interrupted`, whose message names the checkpoint. A second signal raises :class:`Aborted` at
once, wherever the program is (nothing more is written). Outside ``deferred`` (setting up, before
anything worth saving exists), the first signal raises :class:`Interrupted` at once.

A signal that repeats the first within :data:`REPEAT_WINDOW_S` is taken as the same request: a
launcher and a scheduler often both forward one, and that must not abort the checkpoint.

The exceptions are ``KeyboardInterrupt`` subclasses (code that catches Ctrl-C keeps doing so) with
``exit_code`` 128 + the signal number, as a shell reports a process a signal ended.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 1.0


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal; the message says what was kept."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)

    def __str__(self) -> str:
        return str(self.args[0])


class Aborted(Interrupted):
    """A second signal: the run stopped at once, without writing anything more."""


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopRequest:
    """Whether a stop was asked for, and by which signal; set by :func:`stop_on_signals` or by code."""

    def __init__(self):
        self.signum: int | None = None
        self.at = 0.0
        self.deferring = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else "no signal"

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask to stop at the next step boundary (what the first signal does)."""
        if self.signum is None:
            self.signum, self.at = int(signum), time.monotonic()

    @contextlib.contextmanager
    def deferred(self):
        """While the block runs, a first signal is recorded instead of raised."""
        saved, self.deferring = self.deferring, True
        try:
            yield self
        finally:
            self.deferring = saved

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler: record the first request, abort on a second."""
        if self.signum is None:
            self.request(signum)
            if not self.deferring:
                raise Interrupted(signum, f"stopped by {signal_name(signum)} before training began")
            log.warning(
                "%s: stopping after the step in progress, then writing a checkpoint "
                "(send it again to abort at once, without one)",
                signal_name(signum),
            )
        elif time.monotonic() - self.at >= REPEAT_WINDOW_S:
            raise Aborted(signum, f"aborted by a second {signal_name(signum)}")


@contextlib.contextmanager
def stop_on_signals(request: StopRequest, signals=STOP_SIGNALS):
    """Route ``signals`` to ``request.handle`` while the block runs (main thread only: elsewhere
    Python cannot install handlers, and the block runs with the handlers it has)."""
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def forward_signals(process, signals=STOP_SIGNALS):
    """Pass ``signals`` this process receives on to ``process`` (a child started in its own session,
    which a terminal's Ctrl-C does not reach) while the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield process
        return
    previous = {s: signal.signal(s, lambda signum, frame: process.send_signal(signum)) for s in signals}
    try:
        yield process
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
