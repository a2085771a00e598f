"""The model families the engine trains, and how a folder or a loaded model is told apart.

UNet families (``sd``: SD1.x/SD2.x, ``sdxl``) are the engine's original path (``engine/models.py``,
``engine/text.py``). Diffusion transformers (docs/design.md §9) each have a module here:

==========  ==========================  ===========================================
family      transformer class           pipeline (loads the LoRA files)
==========  ==========================  ===========================================
``sd3``     ``SD3Transformer2DModel``   ``StableDiffusion3Pipeline`` (SD3, SD3.5)
``flux``    ``FluxTransformer2DModel``  ``FluxPipeline`` (Flux.1 dev and schnell)
``zimage``  ``ZImageTransformer2DModel``  ``ZImagePipeline`` (Z-Image, Z-Image-Turbo)
==========  ==========================  ===========================================

A folder's family is read from its ``model_index.json`` (the class of its ``transformer``
component); a loaded denoiser's from its class.
"""

from __future__ import annotations

from cat_engine.engine.families.base import DitFamily
from cat_engine.engine.families.flux import FLUX
from cat_engine.engine.families.sd3 import SD3
from cat_engine.engine.families.zimage import ZIMAGE

UNET_FAMILIES = ("sd", "sdxl")
DIT_FAMILIES: dict[str, DitFamily] = {f.name: f for f in (SD3, FLUX, ZIMAGE)}
FAMILY_NAMES = (*UNET_FAMILIES, *DIT_FAMILIES)


def dit_family(name: str | None) -> DitFamily | None:
    """The transformer family called ``name``; ``None`` for the UNet families (and ``None``)."""
    return DIT_FAMILIES.get(name) if name else None


def family_of_index(index: dict) -> str:
    """The family of a diffusers folder from its ``model_index.json`` content."""
    for family in DIT_FAMILIES.values():
        if family.owns(index):
            return family.name
    transformer = index.get("transformer")
    if isinstance(transformer, (list, tuple)) and len(transformer) == 2 and transformer[1]:
        known = ", ".join(f.transformer_class for f in DIT_FAMILIES.values())
        raise ValueError(f"its transformer is a {transformer[1]}; the engine trains {known} and UNets")
    return "sdxl" if "text_encoder_2" in index and index["text_encoder_2"][0] is not None else "sd"


def denoiser_family(model) -> DitFamily | None:
    """The transformer family of a loaded denoiser (by class, peft-wrapped or not); ``None`` for a UNet."""
    name = type(model).__name__
    for family in DIT_FAMILIES.values():
        if name == family.transformer_class:
            return family
    return None


def lora_prefix(model) -> str:
    """The key prefix of ``model``'s adapter in a LoRA file (what ``load_lora_weights`` reads)."""
    family = denoiser_family(model)
    return "unet" if family is None else family.lora_prefix


__all__ = [
    "DIT_FAMILIES",
    "FAMILY_NAMES",
    "UNET_FAMILIES",
    "DitFamily",
    "denoiser_family",
    "dit_family",
    "family_of_index",
    "lora_prefix",
]
