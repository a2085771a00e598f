"""Kernel tests run the Triton code on CPU through Triton's interpreter.

The kernels read TRITON_INTERPRET at launch (they are jitted lazily, per setting, and avoid
triton's import-time-jitted helpers), but triton itself fixes the mode of its own helpers when
first imported, and torch/peft/diffusers import it early. Setting the variable here, before any
test module of this folder imports anything, keeps every triton object in one mode where this
conftest is loaded first. With a GPU present it is left alone: CUDA tensors then run the compiled
kernels, each in one block configuration (CAT_ENGINE_TRITON_AUTOTUNE=0: one compile per kernel
rather than one per configuration; test_autotuned_kernels_on_a_gpu checks autotuning itself).
Outside pytest: ``TRITON_INTERPRET=1 CAT_ENGINE_LORA_PATH=triton python ...``.
"""

import os

import torch

if torch.cuda.is_available():
    os.environ.setdefault("CAT_ENGINE_TRITON_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
