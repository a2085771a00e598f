"""engine/signals.py: the first SIGINT/SIGTERM is a request honoured at a step boundary, a second aborts."""

from __future__ import annotations

import os
import signal

import pytest

from cat_engine.engine import signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_deferred_is_recorded_not_raised(signum):
    stop = signals.StopRequest()
    with signals.stop_on_signals(stop), stop.deferred():
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes of the main thread
            if stop.requested:
                break
    assert stop.signum == signum and stop.name == signal.Signals(signum).name


def test_outside_deferred_the_first_signal_raises_at_once():
    stop = signals.StopRequest()
    with pytest.raises(signals.Interrupted) as info, signals.stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
    assert info.value.exit_code == 128 + signal.SIGTERM and "SIGTERM" in str(info.value)


def test_a_second_signal_aborts_and_a_repeat_within_the_window_does_not(monkeypatch):
    stop = signals.StopRequest()
    with stop.deferred():
        stop.handle(signal.SIGINT)
        stop.handle(signal.SIGINT)  # the same request, forwarded twice (launcher and scheduler)
        assert stop.signum == signal.SIGINT
        monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)
        with pytest.raises(signals.Aborted, match="second SIGTERM") as info:
            stop.handle(signal.SIGTERM)
    assert isinstance(info.value, KeyboardInterrupt) and info.value.exit_code == 128 + signal.SIGTERM


def test_handlers_are_put_back_afterwards():
    before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    with signals.stop_on_signals(signals.StopRequest()):
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == before
