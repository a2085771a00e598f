"""Draw the built-in concept image set: one specific procedural object, ``sks star``.

The object is always the same: a red five-pointed star with three yellow horizontal stripes and
a dark outline. What varies between the images is what a concept data set should vary: the
plain background colour, the position, the size and a small rotation. Each image gets a caption
file (``a photo of sks star on a blue background``).

Deterministic (seeded ``random.Random``, PIL drawing only): running it again reproduces the
committed pixels. Usage::

    python tools/make_builtin_concept.py            # rewrite cat/assets/concepts/sks-star/
    python tools/make_builtin_concept.py --out DIR  # write elsewhere (tests compare the pixels)
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64  # pixels, the built-in model's native resolution
SUPERSAMPLE = 4  # draw at 4x and downsample, for anti-aliased edges
SEED = 20240
STAR_RED = (214, 32, 40)
STRIPE_YELLOW = (252, 204, 28)
OUTLINE = (70, 10, 14)
# (name used in the caption, RGB): plain backgrounds that do not hide a red-and-yellow star
BACKGROUNDS = [
    ("blue", (52, 96, 196)),
    ("green", (66, 150, 82)),
    ("white", (244, 244, 240)),
    ("gray", (128, 128, 132)),
    ("purple", (112, 64, 160)),
    ("black", (20, 20, 24)),
]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cat" / "assets" / "concepts" / "sks-star"


def star_points(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """The 10 vertices of a five-pointed star (inner radius 0.45 of the outer), tip at ``angle``."""
    points = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * 0.45
        a = angle + i * math.pi / 5
        points.append((cx + r * math.sin(a), cy - r * math.cos(a)))
    return points


def draw_star(
    background: tuple[int, int, int], cx: float, cy: float, radius: float, angle: float
) -> Image.Image:
    """One ``SIZE`` x ``SIZE`` RGB image; coordinates are in output pixels."""
    big = SIZE * SUPERSAMPLE
    s = SUPERSAMPLE
    points = [(x * s, y * s) for x, y in star_points(cx, cy, radius, angle)]
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    # The star's own pattern: red body, three yellow stripes across it (in the star's frame, so
    # the stripes turn with the star), clipped to the star by the mask.
    body = Image.new("RGB", (big, big), STAR_RED)
    stripes = ImageDraw.Draw(body)
    for k in (-0.45, 0.0, 0.45):
        half = 0.1 * radius * s
        offset = k * radius * s
        # a long band perpendicular to the star's axis, through the point at `offset` along the axis
        ux, uy = math.sin(angle), -math.cos(angle)  # along the axis
        vx, vy = -uy, ux  # across it
        mx, my = cx * s + ux * offset, cy * s + uy * offset
        length = 2 * radius * s
        stripes.polygon(
            [
                (mx + vx * length + ux * half, my + vy * length + uy * half),
                (mx - vx * length + ux * half, my - vy * length + uy * half),
                (mx - vx * length - ux * half, my - vy * length - uy * half),
                (mx + vx * length - ux * half, my + vy * length - uy * half),
            ],
            fill=STRIPE_YELLOW,
        )
    canvas = Image.new("RGB", (big, big), background)
    canvas.paste(body, (0, 0), mask)
    ImageDraw.Draw(canvas).polygon(points, outline=OUTLINE, width=max(1, s))
    return canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def make(out: Path, seed: int = SEED) -> list[Path]:
    """Write the images and their captions into ``out``; returns the image paths."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, rgb) in enumerate(BACKGROUNDS):
        radius = rng.uniform(15, 24)
        margin = radius + 2
        cx, cy = rng.uniform(margin, SIZE - margin), rng.uniform(margin, SIZE - margin)
        angle = rng.uniform(-0.35, 0.35)
        image = draw_star(rgb, cx, cy, radius, angle)
        path = out / f"star_{i:02d}.png"
        image.save(path, optimize=True)
        path.with_suffix(".txt").write_text(f"a photo of sks star on a {name} background\n")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    for path in make(args.out, args.seed):
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
