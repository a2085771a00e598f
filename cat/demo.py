"""``cat-engine demo``: plain LoRA against CAT on one built-in toy-world concept, side by side.

Reads top to bottom: for each method (``lora``: ``--cat-weight 0``; ``cat``: ``--cat-weight``
lambda) train an adapter on the concept with ``cat-engine train``'s recipe, score it with
``cat-engine eval`` (KPS, docs/design.md §2, on the toy-world model and the toy-world CLIP), then write

    OUTPUT/report.json   both methods' metrics, their differences, settings and timings
    OUTPUT/grid.png      reference images, then per method: token prompt, plain prompt; and the base

Everything runs on the built-in toy world, with no download. :func:`train_and_score` is what ``cat_engine.cat.experiment`` repeats over concepts and
seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cat_engine.cat.config import TrainConfig
from cat_engine.engine.files import write_atomically, write_text_atomically

METHODS = (("lora", 0.0), ("cat", None))  # None: the --cat-weight of the run
METRICS = (
    "identity",
    "preservation",
    "kps",
    "prompt_similarity",
    "leakage",
    "diversity_adapter",
    "diversity_base",
)
DEFAULT_CONCEPT = "green-star"
DEFAULT_CAT_WEIGHT = TrainConfig.cat_weight  # the trainer's default: one number, set from the sweep
DEFAULT_PLAIN_MODE = "class"
DEFAULT_CAT_EVERY = 1
DEFAULT_STEPS = 400
DEFAULT_LR = 3e-3
DEFAULT_RANK = 8
# The eval's prompts: cat-engine eval's four, then more captions of the toy world's kind (its
# scenes, backgrounds and styles), for evaluations that need more images per adapter.
EVAL_TEMPLATES = (
    "a photo of {}",
    "{} on the beach",
    "a painting of {}",
    "{} in the snow",
    "{} in the grass",
    "a picture of {}",
    "a photo of {} on a blue background",
    "{} on a white background",
    "a photo of {} on a gray background",
    "a painting of {} on the beach",
    "a photo of {} in the grass",
    "{} on a pink background",
    "a photo of {} on a black background",
    "a painting of {} in the snow",
    "{} on a yellow background",
    "a photo of {} on an orange background",
)
DEFAULT_EVAL_PROMPTS = 4
DEFAULT_EVAL_SEEDS = 4
DEFAULT_EVAL_STEPS = 20
DEFAULT_EVAL_SEED_STRIDE = 0


def eval_templates(n: int) -> list[str]:
    """The first ``n`` of :data:`EVAL_TEMPLATES`."""
    return list(EVAL_TEMPLATES[:n])


def concept_names() -> list[str]:
    from cat_engine.cat import toyworld

    return list(toyworld.CONCEPTS)


def concept_folder(name: str) -> tuple[Path, str]:
    """The built-in concept folder of ``name`` and its class word."""
    from cat_engine.cat import toyworld
    from cat_engine.engine.errors import CatEngineError

    if name not in toyworld.CONCEPTS:
        raise CatEngineError(
            f"--concept {name}: not a built-in concept; choose from {', '.join(toyworld.CONCEPTS)}"
        )
    return Path(__file__).parent / "assets" / "concepts" / name, toyworld.CONCEPTS[name][0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options = [  # flag, type, default, help
        ("--concept", str, DEFAULT_CONCEPT, f"built-in concept: {', '.join(concept_names())}"),
        ("--output", str, "cat-demo", "output folder"),
        ("--steps", int, DEFAULT_STEPS, "training steps"),
        ("--cat-weight", float, DEFAULT_CAT_WEIGHT, "lambda of the CAT run"),
        ("--plain-mode", str, DEFAULT_PLAIN_MODE, "plain caption of the CAT term: class, strip, empty"),
        ("--cat-every", int, DEFAULT_CAT_EVERY, "the CAT term on every k-th step, at k x lambda"),
        ("--lr", float, DEFAULT_LR, "learning rate"),
        ("--rank", int, DEFAULT_RANK, "LoRA rank"),
        ("--seed", int, 0, "training seed"),
        (
            "--eval-prompts",
            int,
            DEFAULT_EVAL_PROMPTS,
            f"prompt templates: the first N of {len(EVAL_TEMPLATES)}",
        ),
        ("--eval-seeds", int, DEFAULT_EVAL_SEEDS, "sampling seeds per prompt"),
        ("--eval-seed-stride", int, DEFAULT_EVAL_SEED_STRIDE, "prompt p samples seeds + p x STRIDE"),
        ("--eval-steps", int, DEFAULT_EVAL_STEPS, "DDIM steps"),
    ]
    for flag, kind, default, text in options:
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def train_and_score(
    concept: str,
    cat_weight: float,
    seed: int,
    output: Path,
    *,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    rank: int = DEFAULT_RANK,
    eval_seeds: int = 4,
    eval_steps: int = 20,
    progress: bool = False,
    plain_mode: str = "class",
    cat_every: int = 1,
    templates: list[str] | None = None,
    prompt_seed_stride: int = 0,
) -> dict:
    """Train one adapter on a built-in concept and score it; returns kps.json plus timings.

    Writes the adapter to ``output/adapter`` and the KPS report to ``output/eval``. ``templates``:
    the eval's prompt templates (default ``cat-engine eval``'s); ``prompt_seed_stride``: its
    ``--prompt-seed-stride``.
    """
    import torch

    from cat_engine.cat.config import TrainConfig
    from cat_engine.cat.eval import EvalConfig, evaluate
    from cat_engine.cat.report import json_safe, write_report
    from cat_engine.cat.train import train

    folder, class_word = concept_folder(concept)
    config = TrainConfig(
        data=str(folder),
        class_word=class_word,
        cat_weight=cat_weight,
        cat_every=cat_every,
        plain_mode=plain_mode,
        steps=steps,
        lr=lr,
        rank=rank,
        seed=seed,
        output=str(output / "adapter"),
        overwrite=True,  # a demo run starts afresh
        save_every=0,
        keep_checkpoints=1,
    )
    t0 = time.perf_counter()
    lora = train(config.validate(), progress=progress)
    train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    prompts = {} if templates is None else {"templates": list(templates)}
    kps = evaluate(
        EvalConfig(
            lora=str(lora),
            refs=str(folder),
            seeds=eval_seeds,
            steps=eval_steps,
            prompt_seed_stride=prompt_seed_stride,
            **prompts,
        ),
        progress=progress,
    )
    write_report(kps, output / "eval")
    eval_s = time.perf_counter() - t0
    report = json_safe(kps.to_dict())
    report["train_seconds"], report["eval_seconds"] = round(train_s, 1), round(eval_s, 1)
    report["torch_threads"] = torch.get_num_threads()
    report["train"] = {
        "steps": steps,
        "lr": lr,
        "rank": rank,
        "seed": seed,
        "cat_weight": cat_weight,
        "plain_mode": plain_mode,
        "cat_every": cat_every,
    }
    return report


def side_by_side(output: Path, concept: str, runs: dict) -> Path:
    """One image: the references on top, then each method's eval grid, left to right."""
    from PIL import Image, ImageDraw

    folder, _ = concept_folder(concept)
    refs = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    grids = {name: Image.open(output / name / "eval" / "grid.png").convert("RGB") for name in runs}
    cell = 96
    width = sum(g.width for g in grids.values()) + 10 * (len(grids) - 1)
    top = 24 + cell + 30
    canvas = Image.new(
        "RGB", (max(width, cell * len(refs)), top + max(g.height for g in grids.values())), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"references of '{concept}' (sks)", fill="black")
    for i, ref in enumerate(refs):
        canvas.paste(ref.resize((cell, cell), Image.NEAREST), (i * cell, 20))
    x = 0
    for name, grid in grids.items():
        r = runs[name]
        draw.text(
            (x + 4, top - 24),
            f"{name.upper()} (cat-weight {r['train']['cat_weight']:g}): KPS {r['kps']:.3f}  "
            f"ID {r['identity']:.3f}  PRES {r['preservation']:.3f}  LEAK {r['leakage']:+.3f}",
            fill="black",
        )
        canvas.paste(grid, (x, top))
        x += grid.width + 10
    return write_atomically(output / "grid.png", lambda path: canvas.save(path, format="PNG"))


def run(args: argparse.Namespace) -> int:
    import torch

    from cat_engine.engine.errors import CatEngineError

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.eval_seeds < 1 or args.eval_steps < 1:
        raise CatEngineError("--steps, --eval-seeds and --eval-steps must be at least 1")
    if not 1 <= args.eval_prompts <= len(EVAL_TEMPLATES):
        raise CatEngineError(f"--eval-prompts must be 1..{len(EVAL_TEMPLATES)}")
    concept_folder(args.concept)  # a clear error before any work
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {}
    for name, weight in METHODS:
        weight = args.cat_weight if weight is None else weight
        print(
            f"cat-engine demo: {name}: training {args.steps} steps on '{args.concept}' (cat-weight {weight:g}"
            + (f", every {args.cat_every} steps" if weight and args.cat_every > 1 else "")
            + ")",
            flush=True,
        )
        runs[name] = train_and_score(
            args.concept,
            weight,
            args.seed,
            output / name,
            steps=args.steps,
            lr=args.lr,
            rank=args.rank,
            eval_seeds=args.eval_seeds,
            eval_steps=args.eval_steps,
            progress=not args.no_progress,
            plain_mode=args.plain_mode,
            cat_every=args.cat_every if weight else 1,
            templates=eval_templates(args.eval_prompts),
            prompt_seed_stride=args.eval_seed_stride,
        )
    grid = side_by_side(output, args.concept, runs)
    report = {
        "concept": args.concept,
        "model": runs["cat"]["model"]["id"],
        "embedding": runs["cat"]["embedding"]["id"],
        "methods": {
            name: {m: r[m] for m in METRICS}
            | {"train": r["train"], "train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"]}
            for name, r in runs.items()
        },
        "cat_minus_lora": {
            m: runs["cat"][m] - runs["lora"][m]
            for m in METRICS
            if runs["cat"][m] is not None and runs["lora"][m] is not None
        },
        "prompts": runs["cat"]["prompts"],
        "seeds": runs["cat"]["seeds"],
        "sampling": runs["cat"]["sampling"],
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    write_text_atomically(output / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"\n{'':6s}" + "".join(f"{m[:12]:>13s}" for m in METRICS))
    for name in runs:
        print(f"{name:6s}" + "".join(f"{runs[name][m]:13.4f}" for m in METRICS))
    print("\n".join(["", *sweep_lines(SWEEP_RECORD, args, report["cat_minus_lora"])]))
    print(f"\nwrote {output / 'report.json'} and {grid} in {report['seconds']:.0f} s")
    return 0


# ------------------------------------------------------------------ the committed sweep, for scale
SWEEP_RECORD = Path(__file__).resolve().parents[1] / "bench" / "results" / "cat_weight_sweep.json"
SHOWN = ("kps", "identity", "preservation", "leakage")


def sweep_lines(path: Path, args: argparse.Namespace, diff: dict) -> list[str]:
    """This run's CAT - LoRA beside the committed sweep's paired 95% intervals for the same settings.

    One training seed is one draw of a spread that the sweep measured over concepts and seeds; the
    lines say how large that spread is, so one seed is not read as the effect.
    """
    mine = "this run (one training seed): CAT - LoRA " + ", ".join(f"{m} {diff[m]:+.3f}" for m in SHOWN)
    if not path.is_file():
        return [mine, f"(no committed sweep at {path} to compare it with: it is part of the repository)"]
    record = json.loads(path.read_text())
    arm = {
        "cat_weight": args.cat_weight,
        "plain_mode": args.plain_mode,
        "steps": args.steps,
        "cat_every": args.cat_every,
    }
    entry = next((e for e in record["summary"] if e["arm"] == arm and e.get("vs_lora")), None)
    if entry is None:
        return [mine, f"(the committed sweep, {path.name}, has no CAT arm with these settings: {arm})"]
    paired = entry["vs_lora"]
    n_concepts, n_seeds = len(record["concepts"]), len(record["seeds"])

    def cells(pick) -> str:
        return ", ".join(
            f"{m} {pick(paired[m])['mean']:+.3f} [{pick(paired[m])['ci'][0]:+.3f}, {pick(paired[m])['ci'][1]:+.3f}]"
            for m in SHOWN
        )

    lines = [
        mine,
        f"the committed sweep ({path.name}: {n_concepts} concepts x {n_seeds} training seeds, paired, 95% CI):",
        f"  all concepts:  {cells(lambda d: d)}",
    ]
    if args.concept in paired["kps"]["per_concept"]:
        lines.append(f"  {args.concept} only: {cells(lambda d: d['per_concept'][args.concept])}")
    setup = record.get("shared_setup", {})
    ours = (
        eval_templates(args.eval_prompts),
        args.eval_seeds,
        args.eval_steps,
        args.eval_seed_stride,
        args.lr,
        args.rank,
    )
    theirs = tuple(
        setup.get(k) for k in ("eval_prompts", "eval_seeds", "eval_steps", "eval_seed_stride", "lr", "rank")
    )
    if ours != theirs:
        lines.append(
            "  (the sweep's lr, rank or eval settings differ from this run's: see shared_setup in the record)"
        )
    return lines
