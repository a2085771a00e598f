"""Test-wide settings."""

import os


def pytest_configure(config):
    # Generated models (the built-in tiny pipeline) go to a cache of the test run's own, so a
    # cache left by another version of the engine on this machine cannot leak into the tests.
    if "CAT_ENGINE_CACHE" not in os.environ:
        base = config._tmp_path_factory.getbasetemp() if hasattr(config, "_tmp_path_factory") else None
        import tempfile

        os.environ["CAT_ENGINE_CACHE"] = str(base / "cat-engine-cache") if base else tempfile.mkdtemp(prefix="cat-engine-cache-")
