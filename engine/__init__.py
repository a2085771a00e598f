"""cat_engine.engine: LoRA layers, ``fuse_lora``, split-batch execution, memory plan, model loading."""

from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters, save_lora, unfuse_lora
from cat_engine.engine.split_batch import adapter_rows, split_state

__all__ = ["add_lora", "adapter_rows", "fuse_lora", "lora_parameters", "save_lora", "split_state", "unfuse_lora"]
