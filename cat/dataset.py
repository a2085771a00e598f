"""A concept data set: a folder of images with optional same-name ``.txt`` captions.

``load_concept_images`` reads the folder once into float tensors (the images are encoded by the
VAE once and cached, docs/design.md §3, so there is no lazy loading to gain). Subfolders named
``N_name`` (kohya's convention) are read too, each of their images counting ``N`` times per epoch.
Images are centre-cropped to the square resolution, or fitted to aspect-ratio buckets
(``cat/buckets.py``) when the caller gives them. Bad input never ends in
a traceback: a folder that cannot be used raises ``DataError`` with one line naming it and what
to do; a bad file is skipped with one warning line naming it. Warnings go to the ``logging``
logger ``cat_engine.cat.dataset`` (a child of ``cat_engine``), and ``ConceptData.summary``
counts what was used, skipped and changed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cat_engine.cat.buckets import Crop, choose_bucket, cover_scale, fit_to_bucket
from cat_engine.cat.captions import DEFAULT_CAPTION_TEMPLATE, has_token, plain_caption, token_caption
from cat_engine.engine.errors import CatEngineError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya's "10_sks dog": its images count 10 times
DEFAULT_TOKEN = "sks"
DEFAULT_CLASS_WORD = "star"
BUILTIN_CONCEPT = "sks-star"


class DataError(CatEngineError):
    """A --data folder that cannot be used; the message is one line naming it and what to do."""


def builtin_concept_dir() -> Path:
    """The built-in concept images (``sks star``, 6 PNGs of 64 px with captions), shipped as package data."""
    return Path(__file__).parent / "assets" / "concepts" / BUILTIN_CONCEPT


@dataclass
class DataSummary:
    """What ``load_concept_images`` did with each file; the lists hold file names."""

    used: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)  # skipped: could not be decoded
    not_image: list[str] = field(default_factory=list)  # skipped: not an image suffix
    upscaled: list[str] = field(default_factory=list)  # smaller than their bucket (or the resolution)
    converted: list[str] = field(default_factory=list)  # mode was not RGB (grey, alpha, 16-bit, palette)
    caption_files: int = 0  # captions read from .txt files; the rest came from the template
    without_token: list[str] = field(default_factory=list)  # captions that lack the trigger token

    @property
    def skipped(self) -> int:
        return len(self.corrupt) + len(self.not_image)

    def line(self) -> str:
        """One line for the training log."""
        parts = [f"{len(self.used)} images used"]
        if self.skipped:
            parts.append(
                f"{self.skipped} skipped ({len(self.corrupt)} unreadable, {len(self.not_image)} not images)"
            )
        if self.upscaled:
            parts.append(f"{len(self.upscaled)} upscaled")
        if self.converted:
            parts.append(f"{len(self.converted)} converted to RGB")
        parts.append(f"captions from .txt files: {self.caption_files}")
        if self.without_token:
            parts.append(f"{len(self.without_token)} captions without the token")
        return ", ".join(parts)


@dataclass
class ConceptData:
    """A loaded concept data set.

    ``images``: ``N`` rows ``[3, H, W]`` float32 in ``[-1, 1]``, CPU (``H, W`` the row's bucket, or
    the square resolution). ``captions``: ``N`` token captions, row ``i`` belongs to
    ``images[i]``. ``files``: the source image of each row (a flipped copy names its source again;
    ``flipped[i]`` tells which). ``crops``: how each row was cut (SDXL's size conditioning).
    ``repeats``: how often each row counts per epoch (``N`` of its ``N_name`` folder, else 1).
    """

    images: list[torch.Tensor]
    captions: list[str]
    files: list[Path]
    flipped: list[bool]
    token: str
    class_word: str
    resolution: int
    summary: DataSummary
    crops: list[Crop] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def pixels(self) -> torch.Tensor:
        """The rows stacked, ``[N, 3, H, W]``: for a set whose rows share one size."""
        sizes = {tuple(x.shape) for x in self.images}
        if len(sizes) > 1:
            raise ValueError(f"the rows have {len(sizes)} sizes (buckets); use .images")
        return torch.stack(self.images)

    def plain_captions(self, mode: str = "class") -> list[str]:
        """The captions without the trigger token (``class``, ``strip`` or ``empty``; see captions.py)."""
        return [plain_caption(c, self.token, self.class_word, mode) for c in self.captions]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # 16/32-bit integer or float grey: PIL's own convert clips at 255, which turns a 16-bit
        # image white; rescale the full range instead.
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 255.0 if values.max(initial=0.0) <= 255 and image.mode == "I" else 65535.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB ``[H, W]`` image to ``[3, H, W]`` float32 in ``[-1, 1]``."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _read_caption(path: Path) -> str | None:
    """The caption in ``path`` (whitespace folded to single spaces), or ``None`` if absent or empty."""
    if not path.is_file():
        return None
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read the caption (%s); using the caption template", path, type(exc).__name__)
        return None
    if not text:
        log.warning("%s: caption file is empty; using the caption template", path)
        return None
    return text


def _list_entries(folder: Path, data_dir: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise DataError(f"--data {data_dir}: cannot list {folder} ({exc.strerror or exc})") from None
    return [p for p in entries if not p.name.startswith(".")]  # .DS_Store, editor swap files: never data


def _list_files(data_dir: Path) -> list[tuple[Path, int]]:
    """``(file, repeats)`` of the top level (1) and of every ``N_name`` subfolder (``N``)."""
    if not data_dir.exists():
        raise DataError(f"--data {data_dir}: folder not found")
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: is a file; give a folder of images")
    files = []
    for path in _list_entries(data_dir, data_dir):
        if not path.is_dir():
            files.append((path, 1))
            continue
        match = REPEAT_FOLDER.match(path.name)
        if match is None or int(match.group(1)) < 1:
            log.warning(
                "%s: subfolder ignored; images are read from the top level of --data and from "
                "N_name subfolders (N repeats per epoch, e.g. 10_sks dog)",
                path,
            )
            continue
        for inner in _list_entries(path, data_dir):
            if inner.is_dir():
                log.warning("%s: subfolder ignored; N_name folders are read one level deep", inner)
            else:
                files.append((inner, int(match.group(1))))
    if not any(p.suffix.lower() != ".txt" for p, _ in files):
        raise DataError(
            f"--data {data_dir}: folder has no images; put {', '.join(s[1:] for s in IMAGE_SUFFIXES)} files in it"
        )
    return files


def _open_rgb(path: Path, name: str, summary: DataSummary) -> Image.Image | None:
    """The image at ``path`` as 8-bit RGB, or ``None`` (with one warning) when it is skipped."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        kinds = ", ".join(s[1:] for s in IMAGE_SUFFIXES)
        log.warning("%s: skipped, not an image file (%s); use %s", path, suffix or "no suffix", kinds)
        summary.not_image.append(name)
        return None
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now, so a truncated file fails here and not later
            image = ImageOps.exif_transpose(opened)  # phone photos store their rotation in EXIF
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):  # its message repeats the path
            reason = "not a format Pillow can decode"
        else:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("%s: skipped, cannot read the image (%s); re-export or remove it", path, reason)
        summary.corrupt.append(name)
        return None
    if image.mode != "RGB":
        summary.converted.append(name)
        image = _to_rgb(image)
    return image


def _warn_upscaled(path: Path, image: Image.Image, bucket: tuple[int, int], resolution: int) -> None:
    w, h = image.size
    if bucket == (resolution, resolution):
        log.warning(
            "%s: %dx%d is smaller than %d px; upscaled, results may look soft (use images of at least %d px)",
            *(path, w, h, resolution, resolution),
        )
    else:
        log.warning(
            "%s: %dx%d is smaller than its %dx%d bucket; upscaled, results may look soft",
            *(path, w, h, bucket[1], bucket[0]),
        )


def load_concept_images(
    data_dir: str | Path,
    token: str = DEFAULT_TOKEN,
    class_word: str = DEFAULT_CLASS_WORD,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    resolution: int = 512,
    *,
    flip: bool = False,
    buckets: list[tuple[int, int]] | None = None,
) -> ConceptData:
    """Read a concept folder into ``N`` rows ``[3, H, W]`` float32 in ``[-1, 1]`` and N captions.

    Files are taken in sorted name order, an ``N_name`` subfolder's (``repeats`` N) where its name
    sorts. Each image's caption is its same-name ``.txt`` file, else
    ``caption_template`` filled with ``token`` and ``class_word``. ``buckets`` (``(h, w)`` sizes,
    ``cat/buckets.py``): each image is fitted to the one closest to its aspect ratio; without
    them, to the centre ``resolution`` square. ``flip=True`` appends a mirrored copy of every row
    with the same caption (N becomes twice the images), so the augmentation survives latent
    caching. Raises ``DataError`` when the folder is missing, empty or has no usable image, or the
    template uses a field other than ``{token}`` and ``{class_word}``.
    """
    data_dir = Path(data_dir).expanduser()
    if resolution < 8:
        raise DataError(f"--resolution {resolution}: must be at least 8 pixels")
    files = _list_files(data_dir)
    try:
        template_caption = token_caption(caption_template, token, class_word)
    except ValueError as exc:  # unknown field or stray brace: the caller prints DataErrors as one line
        detail = str(exc).replace(f"caption template {caption_template!r} ", "")  # named once is enough
        raise DataError(f"--caption-template {caption_template!r}: {detail}") from None
    summary = DataSummary()
    rows, captions, used, crops, sizes, repeats = [], [], [], [], [], []
    for path, times in files:
        if path.suffix.lower() == ".txt":
            continue  # a caption, read with its image
        name = str(path.relative_to(data_dir))
        image = _open_rgb(path, name, summary)
        if image is None:
            continue
        caption = _read_caption(path.with_suffix(".txt"))
        if caption is None:
            caption = template_caption
        else:
            summary.caption_files += 1
            if not has_token(caption, token):
                txt = path.with_suffix(".txt")
                log.warning("%s: caption %r does not contain the token %r", txt, caption, token)
        if not has_token(caption, token):
            summary.without_token.append(name)
        bucket = choose_bucket(*image.size, buckets) if buckets else (resolution, resolution)
        if cover_scale(*image.size, bucket) > 1:
            _warn_upscaled(path, image, bucket, resolution)
            summary.upscaled.append(name)
        fitted, crop, size = fit_to_bucket(image, bucket)
        rows.append(_to_tensor(fitted))
        crops.append(crop)
        sizes.append(size)
        captions.append(caption)
        used.append(path)
        repeats.append(times)
        summary.used.append(name)
    if not used:
        raise DataError(
            f"--data {data_dir}: no usable image ({len(summary.corrupt)} unreadable, "
            f"{len(summary.not_image)} not images); add {', '.join(s[1:] for s in IMAGE_SUFFIXES)} images"
        )
    if len(used) > summary.caption_files and not has_token(template_caption, token):
        # One line for the template, not one per image that uses it.
        log.warning(
            "caption template %r gives %r, which does not contain the token %r",
            *(caption_template, template_caption, token),
        )
    flipped = [False] * len(used)
    if flip:
        rows = rows + [x.flip(-1) for x in rows]
        crops = crops + [c.mirrored(size[0]) for c, size in zip(crops, sizes)]
        captions, used, repeats, flipped = (
            captions * 2,
            used * 2,
            repeats * 2,
            flipped + [True] * len(flipped),
        )
    return ConceptData(
        rows, captions, used, flipped, token, class_word, resolution, summary, crops=crops, repeats=repeats
    )
