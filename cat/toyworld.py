"""The toy world: a procedural text-image world the built-in models are pretrained on.

A scene is one object on a background, drawn with PIL at 64 px (the built-in model's native
resolution), and a caption that names what is drawn, e.g. ``a photo of a striped red star on a
blue background``. Everything is a pure function of a seed (``random.Random``), so the world, the
pretraining data and the concept sets are reproducible bit for bit.

What varies:
- class: 8 classes, 6 shapes and 2 simple creatures (``CLASSES``);
- colour of the object (10 named colours) and of the background (plain colours or the scenes
  ``the beach``, ``the snow``, ``the grass``);
- pattern: plain, striped, dotted, checkered; in the world a pattern is always white or black
  on the object's colour (``PATTERN_INKS``), which leaves every other two-colour pattern free for
  concepts that the pretraining data never shows (``CONCEPTS``);
- size (small / large, sometimes named in the caption), position, rotation, facing;
- style: a photo, or ``a painting of ...`` (a framed, softened rendering).

Captions drop attributes at random (``a photo of a star``, ``a red star``, ``star on the beach``),
so class-only prompts such as KPS's ``a photo of star`` are in distribution.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64
SUPERSAMPLE = 2
JITTER = 9  # how far from the centre an object may sit (px)
CLASSES = ("star", "circle", "square", "triangle", "heart", "moon", "fish", "bug")
COLOURS = {
    "red": (210, 40, 40),
    "orange": (240, 130, 30),
    "yellow": (240, 210, 40),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (120, 60, 170),
    "pink": (240, 130, 180),
    "white": (240, 240, 236),
    "black": (24, 24, 28),
    "brown": (120, 75, 40),
}
BACKGROUND_COLOURS = ("blue", "green", "white", "gray", "purple", "black", "yellow", "red", "pink", "orange")
GRAY = (128, 128, 132)
SCENES = ("the beach", "the snow", "the grass")
PATTERNS = ("plain", "striped", "dotted", "checkered")
PATTERN_INKS = ("white", "black")  # the only pattern colours the world uses
PATTERN_ADJECTIVE = {"plain": "", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image (and, with caption choices, its caption)."""

    cls: str
    colour: str
    pattern: str
    ink: tuple[int, int, int]  # pattern colour (RGB)
    background: str  # a colour name or a scene in SCENES
    radius: float  # object size in output pixels
    cx: float
    cy: float
    angle: float  # radians
    flip: bool  # creatures face left or right
    phase: float  # pattern offset, 0..1
    painting: bool
    seed: int  # for background texture and noise

    @property
    def size_word(self) -> str:
        return "small" if self.radius < 18 else "large"


def colour_rgb(name: str) -> tuple[int, int, int]:
    return GRAY if name == "gray" else COLOURS[name]


def sample_scene(rng: random.Random, cls: str | None = None) -> Scene:
    """A random scene of the world (never one of the held-out concept patterns)."""
    cls = cls or rng.choice(CLASSES)
    colour = rng.choice(list(COLOURS))
    if rng.random() < 0.25:
        background = rng.choice(SCENES)
    else:
        background = rng.choice([b for b in BACKGROUND_COLOURS if b != colour])
    pattern = rng.choice(PATTERNS) if rng.random() < 0.55 else "plain"
    ink_name = "black" if colour in ("white", "yellow", "pink", "orange") else "white"
    if colour == "black":
        ink_name = "white"
    radius = rng.uniform(13, 17) if rng.random() < 0.3 else rng.uniform(19, 26)
    # Near the centre (within JITTER px): a tiny model learns what a class word draws only when it
    # can tell where the object will be, and an object pushed to the edge loses its silhouette.
    margin = radius * 0.9 + 2
    lo, hi = max(margin, SIZE / 2 - JITTER), min(SIZE - margin, SIZE / 2 + JITTER)
    return Scene(
        cls=cls,
        colour=colour,
        pattern=pattern,
        ink=COLOURS[ink_name],
        background=background,
        radius=radius,
        cx=rng.uniform(lo, hi),
        cy=rng.uniform(lo, hi),
        angle=rng.uniform(-0.5, 0.5),
        flip=rng.random() < 0.5,
        phase=rng.random(),
        painting=rng.random() < 0.15,
        seed=rng.randrange(2**31),
    )


def caption(scene: Scene, rng: random.Random, full: bool = False) -> str:
    """A caption of ``scene``; attributes are dropped at random unless ``full``."""
    keep = (lambda p: True) if full else (lambda p: rng.random() < p)
    words = []
    if scene.pattern != "plain" and keep(0.8):
        words.append(PATTERN_ADJECTIVE[scene.pattern])
    if keep(0.3) and not full:
        words.insert(0, scene.size_word)
    if keep(0.85):
        words.append(scene.colour)
    words.append(scene.cls)
    noun = " ".join(words)
    if full or rng.random() < 0.8:
        noun = ("an " if noun[0] in "aeiou" else "a ") + noun
    if scene.painting:
        prefix = "a painting of " if keep(0.9) else ""
    else:
        r = 0.0 if full else rng.random()
        prefix = "a photo of " if r < 0.7 else ("a picture of " if r < 0.8 else "")
    text = prefix + noun
    if keep(0.8):
        if scene.background in SCENES:
            text += (" on " if scene.background == "the beach" else " in ") + scene.background
        else:
            text += f" on {'an' if scene.background[0] in 'aeiou' else 'a'} {scene.background} background"
    return text


def class_prompt(cls: str) -> str:
    """The prompt used to check that the model knows a class (recognition report)."""
    return f"a photo of a {cls}"


# --------------------------------------------------------------------------- drawing


def _background(scene: Scene, rng: random.Random, big: int) -> Image.Image:
    bg = scene.background
    if bg == "the beach":
        img = Image.new("RGB", (big, big), (120, 180, 235))
        horizon = int(big * rng.uniform(0.35, 0.55))
        d = ImageDraw.Draw(img)
        d.rectangle([0, horizon, big, big], fill=(230, 205, 140))
        d.rectangle([0, horizon - big // 16, big, horizon], fill=(40, 110, 190))  # the sea
    elif bg == "the snow":
        img = Image.new("RGB", (big, big), (225, 235, 248))
        d = ImageDraw.Draw(img)
        for _ in range(40):
            x, y, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(1, 3) * SUPERSAMPLE
            d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    elif bg == "the grass":
        img = Image.new("RGB", (big, big), (70, 140, 50))
        d = ImageDraw.Draw(img)
        for _ in range(60):
            x, y = rng.uniform(0, big), rng.uniform(0, big)
            d.line(
                [x, y, x + rng.uniform(-3, 3) * SUPERSAMPLE, y - 6 * SUPERSAMPLE],
                fill=(40, 100, 30),
                width=SUPERSAMPLE,
            )
    else:
        base = np.array(colour_rgb(bg), dtype=np.float32)
        shade = rng.uniform(-18, 18)
        img = Image.new("RGB", (big, big), tuple(int(np.clip(c + shade, 0, 255)) for c in base))
    return img


def _rotate(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _mask(scene: Scene, big: int) -> tuple[Image.Image, list]:
    """The object's silhouette (``L``) at ``big`` px, and extra strokes (legs, eyes) to draw on top."""
    s = SUPERSAMPLE
    cx, cy, r, a = scene.cx * s, scene.cy * s, scene.radius * s, scene.angle
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    extras = []  # (kind, coords, width)
    if scene.cls == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            t = a + i * math.pi / 5
            pts.append((cx + rr * math.sin(t), cy - rr * math.cos(t)))
        d.polygon(pts, fill=255)
    elif scene.cls == "circle":
        d.ellipse([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=255)
    elif scene.cls == "square":
        h = r * 0.75
        d.polygon(
            _rotate([(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)], cx, cy, a),
            fill=255,
        )
    elif scene.cls == "triangle":
        pts = [
            (cx + r * math.sin(a + k * 2 * math.pi / 3), cy - r * math.cos(a + k * 2 * math.pi / 3) + r * 0.2)
            for k in range(3)
        ]
        d.polygon(pts, fill=255)
    elif scene.cls == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 17, cy - y * r / 17 + r * 0.1))
        d.polygon(_rotate(pts, cx, cy, a), fill=255)
    elif scene.cls == "moon":
        d.ellipse([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=255)
        side = -1 if scene.flip else 1
        ox, oy = cx + side * r * 0.45 * math.cos(a), cy + r * 0.45 * math.sin(a) - r * 0.15
        d.ellipse([ox - r * 0.75, oy - r * 0.75, ox + r * 0.75, oy + r * 0.75], fill=0)
    elif scene.cls == "fish":
        side = -1 if scene.flip else 1
        d.ellipse([cx - r * 0.75, cy - r * 0.45, cx + r * 0.55, cy + r * 0.45], fill=255)
        tail = [
            (cx - side * r * 0.55, cy),
            (cx - side * r * 1.0, cy - r * 0.45),
            (cx - side * r * 1.0, cy + r * 0.45),
        ]
        if side < 0:
            d.ellipse([cx - r * 0.55, cy - r * 0.45, cx + r * 0.75, cy + r * 0.45], fill=255)
        d.polygon(tail, fill=255)
        ex, ey, er = cx + side * r * 0.35, cy - r * 0.1, max(r * 0.1, 1.5 * s)
        extras.append(("eye", [ex - er, ey - er, ex + er, ey + er], 0))
    elif scene.cls == "bug":
        body = [cx - r * 0.6, cy - r * 0.75, cx + r * 0.6, cy + r * 0.65]
        for k in (-1, 0, 1):  # six legs
            y = cy + k * r * 0.35
            extras.append(
                ("leg", [cx - r * 0.95, y + r * 0.12, cx + r * 0.95, y - r * 0.12], max(1, int(r * 0.08)))
            )
        extras.append(
            ("leg", [cx - r * 0.12, cy - r * 0.9, cx - r * 0.4, cy - r * 1.15], max(1, int(r * 0.07)))
        )
        extras.append(
            ("leg", [cx + r * 0.12, cy - r * 0.9, cx + r * 0.4, cy - r * 1.15], max(1, int(r * 0.07)))
        )
        extras.append(("head", [cx - r * 0.3, cy - r * 1.0, cx + r * 0.3, cy - r * 0.5], 0))
        d.ellipse(body, fill=255)
    else:
        raise ValueError(f"unknown class {scene.cls!r}")
    return mask, extras


def _pattern_layer(scene: Scene, big: int) -> Image.Image:
    """The object's body: its colour, with the pattern in ``scene.ink``, in the object's frame."""
    body = Image.new("RGB", (big, big), COLOURS[scene.colour] if scene.colour in COLOURS else scene.colour)
    if scene.pattern == "plain":
        return body
    s = SUPERSAMPLE
    d = ImageDraw.Draw(body)
    cx, cy, r, a = scene.cx * s, scene.cy * s, scene.radius * s, scene.angle
    period = max(r * 0.5, 5 * s)
    n = int(big / period) + 4
    ux, uy = math.sin(a), -math.cos(a)  # along the object's vertical axis
    vx, vy = -uy, ux
    off = scene.phase * period
    if scene.pattern == "striped":
        half = period * 0.28
        for k in range(-n, n + 1):
            o = k * period + off
            mx, my = cx + ux * o, cy + uy * o
            L = big * 2
            d.polygon(
                [
                    (mx + vx * L + ux * half, my + vy * L + uy * half),
                    (mx - vx * L + ux * half, my - vy * L + uy * half),
                    (mx - vx * L - ux * half, my - vy * L - uy * half),
                    (mx + vx * L - ux * half, my + vy * L - uy * half),
                ],
                fill=scene.ink,
            )
    elif scene.pattern == "dotted":
        rad = period * 0.22
        for i in range(-n, n + 1):
            for j in range(-n, n + 1):
                o1, o2 = i * period + off, j * period + off + (period / 2 if i % 2 else 0)
                x, y = cx + ux * o1 + vx * o2, cy + uy * o1 + vy * o2
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=scene.ink)
    elif scene.pattern == "checkered":
        half = period / 2
        for i in range(-n, n + 1):
            for j in range(-n, n + 1):
                if (i + j) % 2:
                    continue
                o1, o2 = i * half + off, j * half + off
                corners = [(o1, o2), (o1 + half, o2), (o1 + half, o2 + half), (o1, o2 + half)]
                d.polygon([(cx + ux * p + vx * q, cy + uy * p + vy * q) for p, q in corners], fill=scene.ink)
    else:
        raise ValueError(f"unknown pattern {scene.pattern!r}")
    return body


def render(scene: Scene) -> Image.Image:
    """The ``SIZE`` x ``SIZE`` RGB image of ``scene`` (deterministic)."""
    big = SIZE * SUPERSAMPLE
    rng = random.Random(scene.seed)
    canvas = _background(scene, rng, big)
    mask, extras = _mask(scene, big)
    dark = (20, 20, 20) if scene.colour != "black" else (110, 110, 110)
    d = ImageDraw.Draw(canvas)
    for kind, coords, width in extras:
        if kind == "leg":
            d.line(coords, fill=dark, width=width * SUPERSAMPLE)
        elif kind == "head":
            d.ellipse(coords, fill=dark)
    outline = mask.filter(ImageFilter.MaxFilter(2 * SUPERSAMPLE + 1))
    canvas.paste(Image.new("RGB", (big, big), dark), (0, 0), outline)
    canvas.paste(_pattern_layer(scene, big), (0, 0), mask)
    for kind, coords, _ in extras:
        if kind == "eye":
            d.ellipse(coords, fill=(255, 255, 255) if scene.colour == "black" else (10, 10, 10))
    image = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    if scene.painting:
        image = image.filter(ImageFilter.GaussianBlur(0.8))
        frame = ImageDraw.Draw(image)
        frame.rectangle([0, 0, SIZE - 1, SIZE - 1], outline=(150, 100, 40), width=4)
        frame.rectangle([3, 3, SIZE - 4, SIZE - 4], outline=(90, 55, 20), width=1)
    noise = np.random.default_rng(scene.seed).normal(0, 3.0, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- concepts

# Specific instances the pretraining data never shows: neither the pattern's colour nor the body's
# is white or black, the world's only pattern inks (PATTERN_INKS; a white body with red stripes
# would be the world's red body with white ones). Each was checked to be learnable at the demo's
# budget (tools/make_toyworld_concepts.py --check). (folder name, class word, scene template)
# fmt: off
CONCEPTS = {
    "green-star": ("star", dict(cls="star", colour="green", pattern="striped", ink=(250, 150, 30), radius=21.0,
                                angle=0.0, flip=False, phase=0.25, painting=False)),
    "spotted-fish": ("fish", dict(cls="fish", colour="purple", pattern="dotted", ink=(250, 215, 40), radius=22.0,
                                  angle=0.0, flip=False, phase=0.4, painting=False)),
    "checkered-bug": ("bug", dict(cls="bug", colour="blue", pattern="checkered", ink=(250, 140, 40), radius=20.0,
                                  angle=0.0, flip=False, phase=0.1, painting=False)),
    "striped-heart": ("heart", dict(cls="heart", colour="yellow", pattern="striped", ink=(120, 60, 170), radius=21.0,
                                    angle=0.0, flip=False, phase=0.3, painting=False)),
    "checkered-circle": ("circle", dict(cls="circle", colour="red", pattern="checkered", ink=(120, 220, 90), radius=22.0,
                                        angle=0.0, flip=False, phase=0.3, painting=False)),
    "dotted-triangle": ("triangle", dict(cls="triangle", colour="pink", pattern="dotted", ink=(40, 170, 80),
                                         radius=22.0, angle=0.0, flip=False, phase=0.3, painting=False)),
}
# fmt: on
CONCEPT_BACKGROUNDS = ("blue", "white", "gray", "the grass", "the beach", "pink")


def concept_scenes(name: str, n: int = 5, seed: int = 7) -> list[tuple[Scene, str]]:
    """``n`` (scene, caption) pairs of concept ``name``: the same object, new backgrounds and positions."""
    cls, spec = CONCEPTS[name]
    rng = random.Random(f"{name}-{seed}")
    backgrounds = [b for b in CONCEPT_BACKGROUNDS if b != spec["colour"]]
    out = []
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]
        r = spec["radius"] * rng.uniform(0.92, 1.08)
        m = r + 2
        scene = Scene(
            background=bg,
            cx=rng.uniform(m, SIZE - m),
            cy=rng.uniform(m, SIZE - m),
            seed=rng.randrange(2**31),
            **{**spec, "radius": r, "angle": spec["angle"] + rng.uniform(-0.15, 0.15)},
        )
        where = ((" on " if bg == "the beach" else " in ") + bg) if bg in SCENES else f" on a {bg} background"
        out.append((scene, f"a photo of sks {cls}{where}"))
    return out


def sample(index: int, seed: int = 0) -> tuple[Image.Image, str, Scene]:
    """Example ``index`` of the world with ``seed``: (image, caption, scene)."""
    rng = random.Random(seed * 1_000_003 + index)
    scene = sample_scene(rng)
    return render(scene), caption(scene, rng), scene


def dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` examples: uint8 images ``[n, 64, 64, 3]``, captions, scenes."""
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    captions, scenes = [], []
    for i in range(n):
        image, text, scene = sample(i, seed)
        images[i] = np.asarray(image)
        captions.append(text)
        scenes.append(scene)
    return images, captions, scenes


__all__ = [
    "CLASSES",
    "COLOURS",
    "SCENES",
    "PATTERNS",
    "Scene",
    "sample_scene",
    "caption",
    "render",
    "sample",
    "dataset",
    "class_prompt",
]
