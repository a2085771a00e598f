"""The toy-world experiment: plain LoRA against CAT on every built-in concept, several seeds.

    OMP_NUM_THREADS=1 python -m cat_engine.cat.experiment            # 3 concepts x 2 methods x 3 seeds

Each run is :func:`cat_engine.cat.demo.train_and_score` (``cat-engine train`` then ``cat-engine
eval`` on the toy world, toy-world CLIP). Runs are appended to ``WORK/runs.jsonl`` as they finish,
and a rerun skips the runs already there, so an interrupted experiment continues where it stopped.
The summary (mean and sample standard deviation over seeds of identity, preservation, KPS,
leakage and diversity, per concept and over all concepts, and the paired CAT - LoRA difference)
goes to ``--results`` (default ``bench/results/toyworld_experiment.json``) with the command that
made it, and is printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

from cat_engine.cat import demo
from cat_engine.engine.builtin import BUILTIN_NAME
from cat_engine.engine.builtin_clip import BUILTIN_CLIP_NAME
from cat_engine.engine.files import write_text_atomically

METRICS = demo.METRICS  # what each run logs
TABLE_METRICS = ("identity", "preservation", "kps", "leakage", "diversity_adapter")
DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "toyworld_experiment.json"


def model_fingerprint() -> str:
    """The built-in model and CLIP's name and a hash of their weights."""
    from cat_engine.engine.builtin import builtin_model_dir
    from cat_engine.engine.builtin_clip import builtin_clip_dir

    digest = hashlib.sha256()
    for folder in (builtin_model_dir(), builtin_clip_dir()):
        for path in sorted(folder.rglob("*.safetensors")):
            digest.update(path.read_bytes())
    return f"{BUILTIN_NAME}+{BUILTIN_CLIP_NAME}:{digest.hexdigest()[:12]}"


def run_setup(args) -> dict:
    """What a logged run depends on besides concept, method and seed: a run is reused only if equal."""
    return {
        "model": model_fingerprint(),
        "steps": args.steps,
        "lr": args.lr,
        "rank": args.rank,
        "cat_weight": args.cat_weight,
        "eval_seeds": args.eval_seeds,
        "eval_steps": args.eval_steps,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(rows: list[dict], concepts: list[str], methods: list[str]) -> dict:
    summary = {}
    for concept in [*concepts, "all"]:
        chosen = [r for r in rows if concept == "all" or r["concept"] == concept]
        summary[concept] = {}
        for method in methods:
            mine = [r for r in chosen if r["method"] == method]
            summary[concept][method] = {m: mean_std([r[m] for r in mine]) for m in METRICS} | {
                "runs": len(mine)
            }
        pairs = {(r["concept"], r["seed"]): r for r in chosen if r["method"] == "lora"}
        diffs = [
            (r, pairs[(r["concept"], r["seed"])])
            for r in chosen
            if r["method"] == "cat" and (r["concept"], r["seed"]) in pairs
        ]
        summary[concept]["cat_minus_lora"] = {m: mean_std([c[m] - lo[m] for c, lo in diffs]) for m in METRICS}
    return summary


def markdown(summary: dict, methods: list[str]) -> str:
    head = "| concept | method | " + " | ".join(TABLE_METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(TABLE_METRICS))]
    for concept, block in summary.items():
        for method in [*methods, "cat_minus_lora"]:
            cells = [
                f"{block[method][m][0]:+.3f} ± {block[method][m][1]:.3f}"
                if method == "cat_minus_lora"
                else f"{block[method][m][0]:.3f} ± {block[method][m][1]:.3f}"
                for m in TABLE_METRICS
            ]
            name = "CAT − LoRA (paired)" if method == "cat_minus_lora" else method
            lines.append(f"| {concept} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cat_engine.cat.experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--concepts", default=",".join(demo.concept_names()), help="comma-separated built-in concepts"
    )
    parser.add_argument(
        "--seeds", type=int, default=3, help="training seeds per concept and method (default %(default)s)"
    )
    parser.add_argument("--steps", type=int, default=demo.DEFAULT_STEPS)
    parser.add_argument("--cat-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=demo.DEFAULT_LR)
    parser.add_argument("--rank", type=int, default=demo.DEFAULT_RANK)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument(
        "--work", type=Path, default=Path("cat-experiment"), help="run folders and runs.jsonl"
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    methods = ["lora", "cat"]
    args.work.mkdir(parents=True, exist_ok=True)
    log_path = args.work / "runs.jsonl"
    setup = run_setup(args)
    logged = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    rows = [r for r in logged if r.get("setup") == setup]
    if len(rows) < len(logged):  # another model or other settings: those runs do not count here
        print(
            f"{log_path}: {len(logged) - len(rows)} logged runs have another model or settings; ignoring them",
            flush=True,
        )
    done = {(r["concept"], r["method"], r["seed"]) for r in rows}
    t0 = time.perf_counter()
    for concept in concepts:
        for seed in range(args.seeds):
            for method in methods:
                if (concept, method, seed) in done:
                    continue
                weight = 0.0 if method == "lora" else args.cat_weight
                report = demo.train_and_score(
                    concept,
                    weight,
                    seed,
                    args.work / f"{concept}-{method}-{seed}",
                    steps=args.steps,
                    lr=args.lr,
                    rank=args.rank,
                    eval_seeds=args.eval_seeds,
                    eval_steps=args.eval_steps,
                )
                row = {
                    "concept": concept,
                    "method": method,
                    "seed": seed,
                    "cat_weight": weight,
                    "setup": setup,
                    **{m: report[m] for m in METRICS},
                    "train_seconds": report["train_seconds"],
                    "eval_seconds": report["eval_seconds"],
                }
                rows.append(row)
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{concept} {method} seed {seed}: KPS {row['kps']:.4f} ID {row['identity']:.4f} "
                    f"PRES {row['preservation']:.4f} LEAK {row['leakage']:+.4f}",
                    flush=True,
                )
    rows = [r for r in rows if r["concept"] in concepts and r["seed"] < args.seeds]
    summary = summarise(rows, concepts, methods)
    table = markdown(summary, methods)
    result = {
        "command": "OMP_NUM_THREADS=1 python -m cat_engine.cat.experiment "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "model": f"{BUILTIN_NAME} (engine/assets/toyworld)",
        "embedding": f"{BUILTIN_CLIP_NAME} (engine/assets/toyworld_clip)",
        "prompts": "cat-engine eval defaults: a photo of {}, {} on the beach, a painting of {}, {} in the snow",
        "runs": rows,
        "summary": summary,
        "table_markdown": table,
        "seconds_this_invocation": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    write_text_atomically(args.results, json.dumps(result, indent=1) + "\n")
    print(table)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
