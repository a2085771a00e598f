"""Shared fixtures of the recipe's tests."""

import subprocess

import pytest


@pytest.fixture
def fake_torchrun(monkeypatch):
    """``subprocess.Popen`` replaced by a child that exits 0 at once; returns the dict where each
    start records its ``command`` and ``kwargs`` (what ``cat/launch.py`` would have run)."""
    seen = {}

    class FakePopen:  # torchrun, started in its own session (signals reach it through the launcher)
        def __init__(self, command, **kwargs):
            seen["command"], seen["kwargs"] = command, kwargs
            self.pid = -1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    return seen
