"""The built-in embedding model for KPS: the pretrained toy-world CLIP, or a tiny random CLIP.

No CLIP image weights can be fetched or shipped (docs/design.md §8), so the evaluator's default
embedding is the **toy-world CLIP**: a small CLIP-style dual encoder trained contrastively by
``tools/pretrain_toyworld.py`` on the procedural world of :mod:`cat_engine.cat.toyworld`. It is a
transformers ``AlignModel`` (ALIGN is CLIP's architecture with a convolutional image tower: a
small EfficientNet on 64 px, which learns the world's shapes where a ViT of this size learnt
only colours and backgrounds) with a text tower that reads the real CLIP BPE tokenizer; its
weights are stored in float16 and loaded as float32. It knows that world's classes, colours,
patterns and backgrounds (and nothing else): scores of toy-world models are meaningful with it;
for real photographs pass ``--clip`` with a real CLIP folder. Outputs name it ``toyworld-clip-v2``.

The **random** tiny CLIP (``tiny_clip``, ``builtin_clip_dir(seed)``, named
``builtin-tiny-clip-random``) remains for tests of code paths: its scores are stable from run to
run but say nothing about image content. ``builtin_clip_dir(seed)`` writes it once as a normal
transformers folder (safetensors, ``preprocessor_config.json``, tokenizer files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cat_engine.engine.builtin import cache_root, clip_tokenizer
from cat_engine.engine.files import write_folder_atomically

BUILTIN_CLIP_NAME = "toyworld-clip-v2"  # the default embedding model
RANDOM_CLIP_NAME = "builtin-tiny-clip-random"
TOYWORLD_CLIP_DIR = Path(__file__).parent / "assets" / "toyworld_clip"
IMAGE_SIZE = 32  # pixels the vision tower sees; generated and reference images are resized to it
# OpenAI CLIP's normalisation, so the folder looks like a real CLIP's to the image processor.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_clip_config():
    from transformers import CLIPConfig

    towers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {
        **towers,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {**towers, "image_size": IMAGE_SIZE, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def tiny_clip(seed: int = 0):
    """The tiny random CLIPModel in memory, in eval mode; the same weights for the same ``seed``."""
    from transformers import CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(tiny_clip_config())
    return model.eval()


def tiny_clip_image_processor(size: int = IMAGE_SIZE):
    """A CLIP image processor resizing to ``size`` px: the tiny random tower's 32 by default, the
    toy-world CLIP's 64 (PIL backend: no torchvision needed)."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4: the PIL implementation is the class itself
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # bicubic, as CLIP
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )


def builtin_clip_dir(seed: int | None = None) -> Path:
    """The default CLIP folder: the toy-world CLIP; with a ``seed``, the random tiny CLIP.

    The random one is written once into the cache and reused.
    """
    if seed is None:
        if (TOYWORLD_CLIP_DIR / "config.json").is_file():
            return TOYWORLD_CLIP_DIR
        seed = 0
    target = cache_root() / (RANDOM_CLIP_NAME + ("" if seed == 0 else f"-seed{seed}"))
    if (target / "config.json").exists():
        return target

    def write(folder: Path) -> None:
        tiny_clip(seed).save_pretrained(folder, safe_serialization=True)
        tiny_clip_image_processor().save_pretrained(folder)
        clip_tokenizer().save_pretrained(folder)

    return write_folder_atomically(target, write, replace_existing=False)  # another process's stays
