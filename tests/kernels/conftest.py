"""Kernel tests run the Triton code on CPU through Triton's interpreter.

TRITON_INTERPRET must be in the environment before triton decorates a kernel. The kernels in
cat_engine.kernels are decorated lazily per setting (so setting it before the first launch is
enough on triton 3.9), but triton 3.0 decides at decoration time and some tools import triton
early, so it is set here, before any test module imports triton or cat_engine.kernels. With a
GPU present it is left alone: CUDA tensors then run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
