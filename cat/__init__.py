"""cat_engine.cat: the CAT method: ``cat_loss``, captions, data set, training recipe, KPS, CLI."""

from cat_engine.cat.loss import CatLossOutput, cat_loss

__all__ = ["CatLossOutput", "cat_loss"]
