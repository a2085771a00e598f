"""The KPS image grid: for each prompt, rows G_tok, G_ada, G_base; columns the seeds.

Preservation shows at a glance: G_ada should look like G_base in the same column (same seed),
and G_tok should show the concept.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROW_NAMES = {"tok": "G_tok adapter", "ada": "G_ada adapter", "base": "G_base base"}
MIN_CELL = 128  # small images (the tiny model's 64 px) are enlarged so a person can see them
LABEL_WIDTH = 220
HEADER = 24


def label_font():
    """The labels' font: Pillow's default, at 13 px where it can be sized."""
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def make_grid(rows: list[tuple[str, str, list[np.ndarray]]], seeds: list[int]) -> Image.Image:
    """Assemble a labelled grid.

    ``rows``: ``(set name in ROW_NAMES, prompt, images)``, the images ``[H, W, 3]`` uint8, one per
    seed in ``seeds`` order. Returns an RGB image.
    """
    if not rows:
        raise ValueError("make_grid: no rows")
    h, w = rows[0][2][0].shape[:2]
    scale = max(1, -(-MIN_CELL // max(h, w)))  # ceil: integer upscaling keeps pixels crisp
    cell_h, cell_w = h * scale, w * scale
    grid = Image.new("RGB", (LABEL_WIDTH + cell_w * len(seeds), HEADER + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font = label_font()
    for col, seed in enumerate(seeds):
        draw.text((LABEL_WIDTH + col * cell_w + 4, 4), f"seed {seed}", fill="black", font=font)
    for r, (name, prompt, images) in enumerate(rows):
        top = HEADER + r * cell_h
        label = ROW_NAMES[name] + "\n" + "\n".join(textwrap.wrap(prompt, 30)[:4])
        draw.multiline_text((4, top + 4), label, fill="black", font=font)
        for col, image in enumerate(images):
            cell = Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(cell, (LABEL_WIDTH + col * cell_w, top))
    return grid
