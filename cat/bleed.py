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

from pathlib import Path

import numpy as np
import torch

from cat_engine.cat import eval as ev
from cat_engine.cat import kps as kps_metrics
from cat_engine.cat.sampling import SETS
from cat_engine.engine.errors import CatEngineError

CELL = 96  # pixels per matrix cell in bleed.png


def read_concepts(path: str | Path) -> list[dict]:
    """``[{token, class_word, refs: Path}]`` from the YAML file (see the module docstring)."""
    import yaml

    path = Path(path).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatEngineError(f"--concepts {path}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise CatEngineError(f"--concepts {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(raw, dict) and "concepts" in raw:
        raw = raw["concepts"]
    if not isinstance(raw, list) or len(raw) < 2:
        raise CatEngineError(
            f"--concepts {path}: expected a list of at least two {{token, class_word, refs}} entries"
        )
    concepts = []
    for i, entry in enumerate(raw):
        entry = (
            {str(k).replace("-", "_"): v for k, v in (entry or {}).items()} if isinstance(entry, dict) else {}
        )
        refs = entry.get("refs") or entry.get("data")
        if not (entry.get("token") and entry.get("class_word") and refs):
            raise CatEngineError(f"--concepts {path}: entry {i} needs token, class_word and refs (or data)")
        refs = Path(str(refs)).expanduser()
        concepts.append({"token": str(entry["token"]), "class_word": str(entry["class_word"]), "refs": refs})
    tokens = [c["token"] for c in concepts]
    if len(set(tokens)) != len(tokens):
        raise CatEngineError(f"--concepts {path}: every concept needs its own token")
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


def _grid_job(index: int, per_concept: int, n_seeds: int) -> bool:
    # The first prompt of each concept, the first seeds: what grid.png and bleed.png show.
    return index % per_concept < min(n_seeds, ev.GRID_MAX_SEEDS)


def run_bleed(args, dist: ev.Dist) -> int:
    """``cat-engine eval --concepts FILE``: per-concept KPS and the bleed matrix; rank 0 writes."""
    if args.seeds < 1 or args.steps < 1 or args.batch_size < 1:
        raise CatEngineError("--seeds, --steps and --batch-size must be at least 1")
    concepts = read_concepts(args.concepts)
    templates = ev.read_templates(args.prompts)
    seeds = list(range(args.seeds))
    per_concept = len(templates) * len(seeds)
    jobs = [job for c in concepts for job in ev.make_jobs(templates, seeds, c["token"], c["class_word"])]
    ref_images = [ev.read_images(c["refs"]) for c in concepts]

    model, settings, embedder = ev.prepare_models(args, dist)

    parts = ev.generate_share(
        model, jobs, settings, embedder, dist, not args.no_progress,
        lambda i: _grid_job(i, per_concept, len(seeds)),
    )  # fmt: skip
    if not dist.main:
        return 0

    emb = ev.assemble(parts, len(jobs))
    refs = [embedder.images(r) for r in ref_images]
    block = [slice(j * per_concept, (j + 1) * per_concept) for j in range(len(concepts))]
    per = []
    for j, c in enumerate(concepts):
        concept_jobs = jobs[block[j]]
        texts = embedder.texts([concept_jobs[p * len(seeds)].plain_prompt for p in range(len(templates))])
        metrics = ev.score({n: emb[n][block[j]] for n in SETS}, refs[j], texts, templates, concept_jobs)
        refs_info = {"folder": str(c["refs"]), "count": len(ref_images[j])}
        per.append({"token": c["token"], "class_word": c["class_word"], "references": refs_info, **metrics})
    identity = identity_matrix([emb["tok"][b] for b in block], refs)
    base = [[kps_metrics.mean_cross_cos(emb["base"][b], r) for r in refs] for b in block]
    n_images = len(SETS) * len(jobs)
    report = {
        "definition": kps_metrics.KPS_VERSION,
        "kps": float(np.mean([p["kps"] for p in per])),  # the concepts' mean
        "per_concept": per,
        "bleed": {
            "rows": "prompting token j (adapter, token prompts)",
            "columns": "reference images of concept i",
            "tokens": [c["token"] for c in concepts],
            "identity": identity,
            "base": base,
            **summarize(identity),
        },
        "seeds": seeds,
        "templates": templates,
        "model": {
            "id": ev.base_id(args.base, model),
            "family": model.family,
            "lora": str(ev.lora_file(args.lora)),
        },
        "embedding": {"id": embedder.id, "random_weights": embedder.id == ev.RANDOM_CLIP_NAME},
        "sampling": {
            "scheduler": ev.SCHEDULER_NAME,
            "steps": args.steps,
            "guidance": args.guidance,
            "resolution": settings.resolution,
        },
        "throughput": {"images": n_images, "generation_seconds": emb["seconds"], "ranks": dist.world},
    }
    output = Path(args.output)
    write_outputs(output, report, emb["grid"], jobs, per_concept, seeds, [r[0] for r in ref_images])
    print(format_matrix(report["bleed"]))
    for p in per:
        print(
            f"{p['token']} {p['class_word']}: KPS {p['kps']:.4f}  identity {p['identity']:.4f}  preservation {p['preservation']:.4f}"
        )
    print(f"wrote {output}/kps.json, grid.png and bleed.png")
    return 0


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


def write_outputs(output: Path, report: dict, grid: dict, jobs, per_concept: int, seeds, first_refs) -> None:
    import json

    from cat_engine.cat.grid import make_grid

    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(ev._json_safe(report), indent=2, allow_nan=False) + "\n"
    ev.write_atomically(output / "kps.json", lambda p: p.write_text(text, encoding="utf-8"))
    shown = seeds[: ev.GRID_MAX_SEEDS]
    rows = []
    for j in range(len(report["per_concept"])):
        first = j * per_concept
        for name in SETS:
            prompt = jobs[first].token_prompt if name == "tok" else jobs[first].plain_prompt
            rows.append((name, prompt, [grid[first + s][name] for s in range(len(shown))]))
    image = make_grid(rows, shown)
    ev.write_atomically(output / "grid.png", lambda p: image.save(p, format="PNG"))
    samples = [grid[j * per_concept]["tok"] for j in range(len(report["per_concept"]))]
    matrix = matrix_image(report["bleed"], samples, [np.asarray(r) for r in first_refs])
    ev.write_atomically(output / "bleed.png", lambda p: matrix.save(p, format="PNG"))


def matrix_image(bleed: dict, samples: list[np.ndarray], refs: list[np.ndarray]):
    """The identity matrix as a picture: row j starts with token j's image (seed 0), column i is
    headed by a reference image of concept i; each cell shows M[j][i], shaded from the matrix's
    lowest (white) to highest (green) value, the diagonal outlined."""
    from PIL import Image, ImageDraw

    from cat_engine.cat.grid import _font

    n = len(bleed["tokens"])
    values = np.asarray(bleed["identity"], dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    image = Image.new("RGB", ((n + 1) * CELL, (n + 1) * CELL + 20), "white")
    draw, font = ImageDraw.Draw(image), _font()

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
