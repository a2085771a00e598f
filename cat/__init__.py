"""cat_engine.cat: the CAT method: ``cat_loss``, captions, data set, training recipe, KPS, CLI."""

from cat_engine.cat.captions import plain_caption, token_caption
from cat_engine.cat.loss import (
    CatLossOutput,
    batch_loss,
    batch_loss_reference,
    cat_batch,
    cat_loss,
    cat_loss_reference,
)
from cat_engine.cat.parallel import CatLoss, data_parallel_cat_loss

__all__ = [
    "CatLoss",
    "CatLossOutput",
    "batch_loss",
    "batch_loss_reference",
    "cat_batch",
    "cat_loss",
    "cat_loss_reference",
    "data_parallel_cat_loss",
    "plain_caption",
    "token_caption",
]
