"""cat_engine.engine: LoRA layers, ``fuse_lora``, split-batch execution, memory plan, model loading."""

from cat_engine.engine.batch import CatBatch
from cat_engine.engine.distributed import TrainStep, data_parallel
from cat_engine.engine.lora import (
    add_lora,
    fuse_lora,
    lora_parameters,
    save_lora,
    save_lora_files,
    unfuse_lora,
)
from cat_engine.engine.row_aware import SplitBatchError, register_row_aware
from cat_engine.engine.split_batch import adapter_rows, split_state

__all__ = [
    "CatBatch",
    "SplitBatchError",
    "TrainStep",
    "adapter_rows",
    "add_lora",
    "data_parallel",
    "fuse_lora",
    "lora_parameters",
    "register_row_aware",
    "save_lora",
    "save_lora_files",
    "split_state",
    "unfuse_lora",
]
