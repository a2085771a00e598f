"""Draw the toy world's built-in concept sets (5 images each), e.g. ``cat/assets/concepts/green-star/``.

Each concept is one specific object the pretraining data never shows (a two-colour pattern the
world does not use, see ``cat_engine.cat.toyworld.CONCEPTS``), on varied backgrounds and positions,
with a caption file per image (``a photo of sks star on a blue background``). Deterministic::

    python tools/make_toyworld_concepts.py             # rewrite the committed sets
    python tools/make_toyworld_concepts.py --out DIR   # write DIR/<name>/ instead
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cat_engine.cat import toyworld as tw

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "cat" / "assets" / "concepts"


def make(out: Path) -> list[Path]:
    paths = []
    for name in tw.CONCEPTS:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, (scene, text) in enumerate(tw.concept_scenes(name)):
            path = folder / f"{name}_{i:02d}.png"
            tw.render(scene).save(path, optimize=True)
            path.with_suffix(".txt").write_text(text + "\n")
            paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in make(args.out):
        print(path)


if __name__ == "__main__":
    main()
