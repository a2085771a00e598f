"""cat_engine.kernels: the LoRA linear's paths, their dispatch, and PyTorch references (docs/design.md §5).

``lora_linear`` runs the cuBLAS-first torch path (``lora_torch.py``) or the Triton path
(``lora_triton.py``), as ``dispatch.py`` chooses: measured once per shape on a GPU, the torch
path on CPU; ``CAT_ENGINE_LORA_PATH=torch|triton`` forces one.
"""

from cat_engine.kernels.lora_linear import lora_linear

__all__ = ["lora_linear"]
