"""What ``--cat-every k`` saves: time per training step of plain LoRA and CAT at k = 1, 2, 4, side by side.

    OMP_NUM_THREADS=1 python -m cat_engine.bench.cat_every --cat-weight 1 --rounds 12

One process, one thread (``--threads``): a trainer per candidate (plain LoRA, then CAT with
``--cat-every`` k for each k), all on the same built-in concept with the demo's recipe, set up
first; then ``--rounds`` rounds, each timing a block of ``--block`` steps of every candidate in
turn (round-robin, so load from other processes hits every candidate alike). A block of 4 steps
holds the same number of CAT steps for every k in {1, 2, 4}. After one warm-up block each,
``seconds_per_step`` is the median over rounds of a block's time per step; ``extra_vs_lora`` is
(candidate - LoRA) / LoRA. Writes ``--results`` (default
``bench/results/toyworld_cat_every_timing.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cat_engine.cat import demo
from cat_engine.cat.config import TrainConfig
from cat_engine.cat.train import Trainer
from cat_engine.engine.files import write_text_atomically

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "toyworld_cat_every_timing.json"


def trainer(concept: str, weight: float, every: int, output: Path) -> Trainer:
    folder, class_word = demo.concept_folder(concept)
    config = TrainConfig(
        data=str(folder),
        class_word=class_word,
        cat_weight=weight,
        cat_every=every,
        steps=10**9,  # the loop is driven here, one step at a time
        lr=demo.DEFAULT_LR,
        rank=demo.DEFAULT_RANK,
        output=str(output),
        save_every=0,
    )
    return Trainer.setup(config.validate())


def block(t: Trainer, steps: int) -> float:
    """Seconds per step over ``steps`` optimizer steps."""
    start = time.perf_counter()
    for _ in range(steps):
        t.run_step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cat_engine.bench.cat_every", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--concept", default=demo.DEFAULT_CONCEPT)
    parser.add_argument("--cat-weight", type=float, default=1.0, help="lambda of the CAT candidates")
    parser.add_argument("--every", default="1,2,4", help="k values (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds (default %(default)s)")
    parser.add_argument("--block", type=int, default=4, help="steps per timed block (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    every = [int(k) for k in args.every.split(",")]
    names = ["lora", *(f"cat_every_{k}" for k in every)]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"lora": trainer(args.concept, 0.0, 1, Path(tmp) / "lora")}
        for k in every:
            trainers[f"cat_every_{k}"] = trainer(args.concept, args.cat_weight, k, Path(tmp) / f"k{k}")
        for t in trainers.values():
            block(t, args.block)  # warm-up
        times = {name: [] for name in names}
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        for _ in range(args.rounds):
            for name in names:
                times[name].append(block(trainers[name], args.block))
    median = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "command": "OMP_NUM_THREADS=1 python -m cat_engine.bench.cat_every "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "started": started,
        "what": f"{args.concept}, demo recipe (rank {demo.DEFAULT_RANK}, batch 1), CAT lambda {args.cat_weight:g}; "
        f"{args.rounds} rounds x {args.block} steps per candidate, round-robin in one process",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds_per_step": median,
        "extra_vs_lora": {name: (median[name] - median["lora"]) / median["lora"] for name in names},
        "blocks": times,
    }
    write_text_atomically(args.results, json.dumps(result, indent=1) + "\n")
    for name in names:
        print(f"{name:12s} {median[name] * 1e3:8.2f} ms/step  {result['extra_vs_lora'][name]:+.1%} vs LoRA")
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
