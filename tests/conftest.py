"""Test-wide settings."""

import os


def pytest_configure(config):
    # The test models are tiny: one intra-op thread is as fast, and immune to the OpenMP stalls
    # that made a 6-step training run take 57 s instead of 1.4 s when another process held one
    # of the two cores. Subprocesses (CLI, torchrun) inherit it through the environment.
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
    # Generated models (the built-in tiny pipeline) go to a cache of the test run's own, so a
    # cache left by another version of the engine on this machine cannot leak into the tests.
    if "CAT_ENGINE_CACHE" not in os.environ:
        base = config._tmp_path_factory.getbasetemp() if hasattr(config, "_tmp_path_factory") else None
        import tempfile

        os.environ["CAT_ENGINE_CACHE"] = str(base / "cat-engine-cache") if base else tempfile.mkdtemp(prefix="cat-engine-cache-")
