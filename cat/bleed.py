"""Cross-concept check of a multi-concept adapter: does token ``j`` bring concept ``i``? (``cat-engine eval --concepts``)

One adapter trained on several concepts (each its own token, class word and images) should bring
concept ``j`` for token ``j`` and no other. With ``G_tok(j)`` the images generated with token
``j``'s prompts and ``R_i`` concept ``i``'s reference images, the **identity matrix** is

    M[j][i] = mean cos(E(G_tok(j)), E(R_i))            rows: prompting token j, cols: concept i

(the kps-v1 identity, docs/design.md §2, between every pair). Its diagonal is each concept's identity;
the off-diagonal entries are **bleed**. ``base[j][i]`` is the same mean for the frozen base model on
the plain prompt of concept ``j`` (class word, no token): how close the class alone already is to
``R_i``, the level bleed should be read against. Every concept's full KPS report is computed from
the same images (``G_tok``, ``G_ada``, ``G_base`` per concept, as ``cat-engine eval`` makes them).

Written to ``OUTPUT/kps.json`` (``per_concept`` and ``bleed``), ``OUTPUT/grid.png`` (for each concept
its first prompt's G_tok, G_ada, G_base rows) and ``OUTPUT/bleed.png`` (the matrix, with a
generated image per row and a reference image per column). Sharded over torchrun ranks like eval.

The concepts file is YAML: a list (or ``concepts:`` holding one) of ``{token, class_word, refs}``;
``data`` is accepted for ``refs``, so a training config's ``concepts`` list serves as is. Relative
folders are read from the working folder, as ``cat-engine train --config`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cat_engine.cat import kps as kps_metrics
from cat_engine.cat.eval import (
    EvalConfig,
    EvalError,
    generate,
    lora_file,
    make_jobs,
    model_info,
    prepare_models,
    read_images,
    scheduler_name,
    score,
)
from cat_engine.cat.grid import label_font, make_grid
from cat_engine.cat.kps import KPS_VERSION
from cat_engine.cat.report import GRID_FILE, GRID_MAX_SEEDS, REPORT_FILE, GridRow, Report, grid_rows
from cat_engine.cat.sampling import SETS
from cat_engine.engine import distributed as dist

CELL = 96  # pixels per matrix cell in bleed.png
BLEED_FILE = "bleed.png"


def read_concepts(path: str | Path) -> list[dict]:
    """``[{token, class_word, refs: Path}]`` from the YAML file (see the module docstring)."""
    import yaml

    path = Path(path).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EvalError(f"--concepts {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise EvalError(f"--concepts {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(raw, dict) and "concepts" in raw:
        raw = raw["concepts"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise EvalError(
            f"--concepts {path}: expected a list of at least two {{token, class_word, refs}} entries"
        )
    concepts = []
    for i, entry in enumerate(raw):
        entry = (
            {str(k).replace("-", "_"): v for k, v in (entry or {}).items()} if isinstance(entry, dict) else {}
        )
        refs = entry.get("refs") or entry.get("data")
        if not (entry.get("token") and entry.get("class_word") and refs):
            raise EvalError(f"--concepts {path}: entry {i} needs token, class_word and refs (or data)")
        refs = Path(str(refs)).expanduser()
        concepts.append({"token": str(entry["token"]), "class_word": str(entry["class_word"]), "refs": refs})
    tokens = [c["token"] for c in concepts]
    if len(set(tokens)) != len(tokens):
        raise EvalError(f"--concepts {path}: every concept needs its own token")
    return concepts


def identity_matrix(tok: list[torch.Tensor], refs: list[torch.Tensor]) -> list[list[float]]:
    """``M[j][i] = identity(tok[j], refs[i])``: embeddings of token j's images against concept i's references."""
    return [[kps_metrics.identity(t, r) for r in refs] for t in tok]


def summarize(matrix: list[list[float]]) -> dict:
    """Mean diagonal (``self``), mean off-diagonal (``cross``) and their difference (``margin``)."""
    m = np.asarray(matrix, dtype=np.float64)
    off = ~np.eye(len(m), dtype=bool)
    own, cross = float(np.diag(m).mean()), float(m[off].mean())
    return {"self": own, "cross": cross, "margin": own - cross}


@dataclass
class BleedReport(Report):
    """A multi-concept run: every number of ``kps.json`` (:meth:`to_dict`), ``grid.png`` and ``bleed.png``."""

    per_concept: list[dict]  # token, class_word, references and the one-concept metrics with per_prompt
    bleed: dict  # rows, columns, tokens, identity (the matrix), base, self, cross, margin
    seeds: list[int]
    templates: list[str]
    model: dict  # id, family, lora
    embedding: dict  # id, random_weights
    sampling: dict  # scheduler, steps, guidance, resolution
    throughput: dict  # images, generation_seconds, ranks
    grid: list[GridRow] = field(default_factory=list, repr=False)  # each concept's first prompt
    samples: list[np.ndarray] = field(default_factory=list, repr=False)  # token j's first image
    references: list[np.ndarray] = field(default_factory=list, repr=False)  # concept i's first reference
    definition: str = KPS_VERSION

    JSON_KEYS = ("definition", "kps", "per_concept", "bleed", "seeds", "templates", "model", "embedding")
    JSON_KEYS += ("sampling", "throughput")

    @property
    def kps(self) -> float:
        """The concepts' mean KPS."""
        return float(np.mean([p["kps"] for p in self.per_concept]))

    def images(self) -> dict:
        return {
            GRID_FILE: make_grid(self.grid, self.seeds[:GRID_MAX_SEEDS]),
            BLEED_FILE: matrix_image(self.bleed, self.samples, self.references),
        }

    def summary(self, output: str | Path) -> list[str]:
        """What ``cat-engine eval --concepts`` prints once the report is written to ``output``."""
        lines = [format_matrix(self.bleed)]
        for p in self.per_concept:
            lines.append(
                f"{p['token']} {p['class_word']}: KPS {p['kps']:.4f}  identity {p['identity']:.4f}  "
                f"preservation {p['preservation']:.4f}"
            )
        lines.append(f"wrote {output}/{REPORT_FILE}, {GRID_FILE} and {BLEED_FILE}")
        return lines


def evaluate_concepts(
    config: EvalConfig,
    concepts: list[dict],
    *,
    ranks: dist.DistContext = dist.SINGLE,
    device: torch.device | None = None,
    progress: bool = True,
) -> BleedReport:
    """Per-concept KPS and the bleed matrix of one adapter over ``concepts`` (:func:`read_concepts`).

    ``config``'s token, class word and references are not used: each concept brings its own.
    ``ranks``, ``device`` and ``progress`` as for :func:`cat_engine.cat.eval.evaluate`.
    """
    config.validate()
    device = device or dist.device_for("auto", ranks)
    templates, seeds = config.templates, config.seed_list()
    per_concept = len(templates) * len(seeds)
    stride = config.prompt_seed_stride
    jobs = [job for c in concepts for job in make_jobs(templates, seeds, c["token"], c["class_word"], stride)]
    ref_images = [read_images(c["refs"]) for c in concepts]

    model, settings, embedder = prepare_models(config, config.base, device)

    def in_grid(i: int) -> bool:  # each concept's first prompt, its first seeds
        return i % per_concept < min(len(seeds), GRID_MAX_SEEDS)

    emb = generate(model, jobs, settings, embedder, ranks, progress, in_grid)
    refs = [embedder.images(r) for r in ref_images]
    block = [slice(j * per_concept, (j + 1) * per_concept) for j in range(len(concepts))]
    per = []
    for j, c in enumerate(concepts):
        concept_jobs = jobs[block[j]]
        texts = embedder.texts([concept_jobs[p * len(seeds)].plain_prompt for p in range(len(templates))])
        metrics = score({n: emb[n][block[j]] for n in SETS}, refs[j], texts, templates, concept_jobs)
        refs_info = {"folder": str(c["refs"]), "count": len(ref_images[j])}
        per.append({"token": c["token"], "class_word": c["class_word"], "references": refs_info, **metrics})
    identity = identity_matrix([emb["tok"][b] for b in block], refs)
    firsts = [j * per_concept for j in range(len(concepts))]
    return BleedReport(
        per_concept=per,
        bleed={
            "rows": "prompting token j (adapter, token prompts)",
            "columns": "reference images of concept i",
            "tokens": [c["token"] for c in concepts],
            "identity": identity,
            "base": [[kps_metrics.mean_cross_cos(emb["base"][b], r) for r in refs] for b in block],
            **summarize(identity),
        },
        seeds=seeds,
        templates=templates,
        model=model_info(config.base, model, lora_file(config.lora)),
        embedding=embedder.info(),
        sampling={
            "scheduler": scheduler_name(model),
            "steps": config.steps,
            "guidance": settings.guidance,
            "resolution": settings.resolution,
        },
        throughput={
            "images": len(SETS) * len(jobs),
            "generation_seconds": emb["seconds"],
            "ranks": ranks.world,
        },
        grid=grid_rows(jobs, firsts, emb["grid"], min(len(seeds), GRID_MAX_SEEDS)),
        samples=[emb["grid"][first]["tok"] for first in firsts],
        references=[np.asarray(r[0]) for r in ref_images],
    )


def format_matrix(bleed: dict) -> str:
    """The identity matrix as text: rows the prompting tokens, columns the concepts' references."""
    tokens = bleed["tokens"]
    width = max(8, *(len(t) + 2 for t in tokens))
    lines = ["identity: prompt token (row) vs concept references (column)"]
    lines.append(" " * width + "".join(f"{t:>{width}}" for t in tokens))
    for t, row in zip(tokens, bleed["identity"]):
        lines.append(f"{t:<{width}}" + "".join(f"{v:>{width}.4f}" for v in row))
    lines.append(
        f"self {bleed['self']:.4f}  cross (bleed) {bleed['cross']:.4f}  margin {bleed['margin']:.4f}"
    )
    return "\n".join(lines)


def matrix_image(bleed: dict, samples: list[np.ndarray], refs: list[np.ndarray]):
    """The identity matrix as a picture: row j starts with token j's image (seed 0), column i is
    headed by a reference image of concept i; each cell shows M[j][i], shaded from the matrix's
    lowest (white) to highest (green) value, the diagonal outlined."""
    from PIL import Image, ImageDraw

    n = len(bleed["tokens"])
    values = np.asarray(bleed["identity"], dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    image = Image.new("RGB", ((n + 1) * CELL, (n + 1) * CELL + 20), "white")
    draw, font = ImageDraw.Draw(image), label_font()

    def thumb(array):
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB").resize((CELL - 8, CELL - 24))

    draw.text((4, 4), "prompt \\ refs", fill="black", font=font)
    for k, token in enumerate(bleed["tokens"]):
        image.paste(thumb(refs[k]), ((k + 1) * CELL + 4, 4))
        draw.text(((k + 1) * CELL + 4, CELL - 18), f"refs {token}", fill="black", font=font)
        image.paste(thumb(samples[k]), (4, (k + 1) * CELL + 4))
        draw.text((4, (k + 2) * CELL - 18), f"prompt {token}", fill="black", font=font)
    for j in range(n):
        for i in range(n):
            share = 0.0 if high == low else (values[j, i] - low) / (high - low)
            colour = tuple(int(255 - share * (255 - c)) for c in (40, 160, 60))
            box = ((i + 1) * CELL, (j + 1) * CELL, (i + 2) * CELL - 1, (j + 2) * CELL - 1)
            draw.rectangle(box, fill=colour, outline="black", width=3 if i == j else 1)
            draw.text((box[0] + 8, box[1] + CELL // 2 - 8), f"{values[j, i]:.3f}", fill="black", font=font)
    draw.text(
        (4, (n + 1) * CELL + 4), "identity = mean CLIP cos(generated, references)", fill="black", font=font
    )
    return image
