"""cat_engine.kernels: Triton kernels, their custom ops, and PyTorch references (docs/design.md §5).

``lora_linear`` dispatches at call time: CUDA tensors to Triton, CPU tensors to
``kernels/reference.py`` (``CAT_ENGINE_FORCE_TRITON=1`` sends them to Triton, under
``TRITON_INTERPRET=1``).
"""

from cat_engine.kernels.lora_linear import lora_linear

__all__ = ["lora_linear"]
