"""The image-text embedding model of KPS (docs/design.md §2): CLIP image and text embeddings, in batches."""

from __future__ import annotations

from pathlib import Path

import torch

from cat_engine.engine import builtin_clip
from cat_engine.engine.errors import CatEngineError

# Weights in these formats are pickles: loading one can run any code it holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ClipError(CatEngineError):
    """A ``--clip`` folder that cannot be used; the message names it and the problem."""


def check_safetensors_weights(path: Path) -> None:
    """Refuse a folder without safetensors weights: nothing a user hands the engine is unpickled."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ClipError(
            f"--clip {path}: only pickle weights ({', '.join(pickles)}); the engine reads safetensors "
            "only (a pickle can run code): convert them, e.g. with transformers' save_pretrained"
        )
    raise ClipError(f"--clip {path}: no .safetensors weights in the folder")


def resolve_clip(clip: str | None) -> tuple[Path, str]:
    """The CLIP folder and its id for reports.

    ``None``: the built-in default (the toy-world CLIP where shipped, else the random tiny one);
    ``builtin-tiny-clip-random``: the random tiny CLIP; anything else: a folder.
    """
    if clip == builtin_clip.RANDOM_CLIP_NAME:
        return builtin_clip.builtin_clip_dir(0), builtin_clip.RANDOM_CLIP_NAME
    if clip is None:
        path = builtin_clip.builtin_clip_dir()
        pretrained = path == builtin_clip.TOYWORLD_CLIP_DIR
        return path, (builtin_clip.BUILTIN_CLIP_NAME if pretrained else builtin_clip.RANDOM_CLIP_NAME)
    path = Path(clip).expanduser()
    return path, str(path)


class ClipEmbedder:
    """CLIP image and text embeddings, in batches, from a local transformers folder.

    Any transformers dual encoder with ``get_image_features``/``get_text_features`` and a CLIP
    tokenizer and image processor in its folder: a real ``CLIPModel``, or the built-in toy-world
    embedding model (an ``AlignModel``: a small EfficientNet image tower and text tower).
    """

    def __init__(self, clip: str | None, device: torch.device, batch: int = 64):
        from transformers import AutoModel, CLIPTokenizer

        path, self.id = resolve_clip(clip)
        if not (path / "config.json").is_file():
            raise ClipError(f"--clip {path}: not a transformers CLIP folder (no config.json)")
        check_safetensors_weights(path)
        try:
            # float32 whatever the folder stores (the built-in one is saved in float16 to stay small)
            self.model = AutoModel.from_pretrained(
                path, local_files_only=True, torch_dtype=torch.float32, use_safetensors=True
            )
            self.model = self.model.to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = _image_processor_class().from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ClipError(f"--clip {path}: cannot load it: {str(exc).splitlines()[0]}") from None
        if not all(hasattr(self.model, f) for f in ("get_image_features", "get_text_features")):
            raise ClipError(
                f"--clip {path}: {type(self.model).__name__} is not an image-text embedding model"
            )
        self.device, self.batch = device, batch

    @property
    def random_weights(self) -> bool:
        """True for the random tiny CLIP, whose scores mean nothing."""
        return self.id == builtin_clip.RANDOM_CLIP_NAME

    def info(self) -> dict:
        """The report's ``embedding`` entry."""
        return {"id": self.id, "random_weights": self.random_weights}

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        """Float32 CPU embeddings ``[N, D]`` of PIL images or uint8 arrays ``[H, W, 3]``."""
        out = []
        for start in range(0, len(images), self.batch):
            chunk = list(images[start : start + self.batch])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """Float32 CPU embeddings ``[N, D]`` of ``texts``."""
        out = []
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            out.append(_features(self.model.get_text_features(**tokens.to(self.device))))
        return torch.cat(out)


def _image_processor_class():
    # torchvision is not a dependency: take transformers' PIL implementation by name where it exists.
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    tensor = output if torch.is_tensor(output) else output.pooler_output
    return tensor.float().cpu()
