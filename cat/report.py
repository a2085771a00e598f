"""KPS reports and their one writer: ``OUTPUT/kps.json`` and the report's images, each written atomically.

A :class:`Report` has ``to_dict()`` (the content of ``kps.json``) and ``images()`` (file name to PIL
image): :class:`KpsReport` for one concept (``cat-engine eval``), ``BleedReport`` for several
(``cat-engine eval --concepts``, cat/bleed.py). :func:`write_report` writes either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cat_engine.cat.grid import make_grid
from cat_engine.cat.kps import KPS_VERSION, METRICS
from cat_engine.cat.sampling import SETS, Job
from cat_engine.engine.files import write_atomically, write_text_atomically

REPORT_FILE = "kps.json"
GRID_FILE = "grid.png"
GRID_MAX_PROMPTS, GRID_MAX_SEEDS = 4, 8  # what grid.png shows at most
PROMPT_KEYS = ("template", "token_prompt", "plain_prompt")

GridRow = tuple[str, str, list[np.ndarray]]  # (set name, prompt, one uint8 [H, W, 3] image per seed)


class Report:
    """What :func:`write_report` writes: ``kps.json`` holds the attributes named in ``JSON_KEYS``
    (fields or properties), in that order; ``images()`` gives the image files."""

    JSON_KEYS: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The content of ``kps.json``."""
        return {key: getattr(self, key) for key in self.JSON_KEYS}

    def images(self) -> dict:
        """File name -> PIL image."""
        return {}


@dataclass
class KpsReport(Report):
    """One adapter's KPS run: every number of ``kps.json`` (:meth:`to_dict`) and the images of ``grid.png``.

    The metrics are kps-v1's (docs/design.md §2, cat/kps.py) over all prompts and seeds; a
    diversity is ``nan`` when a set has fewer than two images (``null`` in ``kps.json``).
    """

    kps: float
    identity: float
    preservation: float
    prompt_similarity: float
    leakage: float
    diversity_adapter: float
    diversity_base: float
    per_prompt: list[dict]  # per template: template, token_prompt, plain_prompt and the metrics above
    seeds: list[int]
    token: str
    class_word: str
    model: dict  # id, family, lora
    embedding: dict  # id, random_weights
    references: dict  # folder, count
    sampling: dict  # scheduler, steps, guidance, resolution, dtype
    throughput: dict  # images, generation_seconds, images_per_second, ranks
    grid: list[GridRow] = field(default_factory=list, repr=False)
    definition: str = KPS_VERSION

    JSON_KEYS = (
        *METRICS,
        *("per_prompt", "definition", "images_per_second", "seeds", "prompts", "token", "class_word"),
        *("model", "embedding", "references", "sampling", "throughput"),
    )

    @property
    def images_per_second(self) -> float:
        return self.throughput["images_per_second"]

    @property
    def prompts(self) -> list[dict]:
        """Each template with its token and plain prompt."""
        return [{k: v for k, v in row.items() if k in PROMPT_KEYS} for row in self.per_prompt]

    def images(self) -> dict:
        """``grid.png``: for the first prompts, rows G_tok, G_ada, G_base; columns the first seeds."""
        return {GRID_FILE: make_grid(self.grid, self.seeds[:GRID_MAX_SEEDS])}

    def summary(self, output: str | Path) -> list[str]:
        """What ``cat-engine eval`` prints once the report is written to ``output``."""
        lines = [
            f"KPS {self.kps:.4f}  identity {self.identity:.4f}  preservation {self.preservation:.4f}  "
            f"prompt similarity {self.prompt_similarity:.4f}  leakage {self.leakage:+.4f}  "
            f"diversity adapter/base {self.diversity_adapter:.4f}/{self.diversity_base:.4f}",
            f"{self.throughput['images']} images in {self.throughput['generation_seconds']:.1f} s: "
            f"{self.images_per_second:.2f} images/s; wrote {output}/{REPORT_FILE} and {GRID_FILE}",
        ]
        if self.embedding["random_weights"]:
            lines.append(
                "note: the built-in CLIP has random weights; pass --clip with a real CLIP folder for meaningful scores"
            )
        return lines


def grid_rows(jobs: list[Job], first_jobs: list[int], images: dict, n_seeds: int) -> list[GridRow]:
    """The grid's rows: for each job index in ``first_jobs``, G_tok, G_ada and G_base of it and the
    next ``n_seeds - 1`` jobs (the same prompt's next seeds). ``images[job index][set name]``."""
    rows = []
    for first in first_jobs:
        for name in SETS:
            prompt = jobs[first].token_prompt if name == "tok" else jobs[first].plain_prompt
            rows.append((name, prompt, [images[first + s][name] for s in range(n_seeds)]))
    return rows


def json_safe(value):
    """``value`` with every float NaN as ``None``: JSON has no NaN, and an undefined metric is null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_report(report: Report, output: str | Path) -> Path:
    """Write ``report`` into the folder ``output``: ``kps.json`` and its images. Returns the folder."""
    output = Path(output)
    text = json.dumps(json_safe(report.to_dict()), indent=2, allow_nan=False) + "\n"
    write_text_atomically(output / REPORT_FILE, text)
    for name, image in report.images().items():
        write_atomically(output / name, lambda path, image=image: image.save(path, format="PNG"))
    return output
