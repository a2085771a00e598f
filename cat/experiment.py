"""The toy-world experiment: plain LoRA against CAT on the built-in concepts, over seeds and settings.

    OMP_NUM_THREADS=1 python -m cat_engine.cat.experiment --cat-weights 0,0.25,0.5,1,2 --seeds 6 --processes 2

**Arms.** Every combination of ``--cat-weights``, ``--plain-modes``, ``--steps`` and ``--cat-every``
is an arm. Weight 0 is plain LoRA, for which the plain mode and cat-every mean nothing, so it is
one arm per ``--steps``; that LoRA arm runs whether or not 0 is listed, since every CAT arm is
compared with it. Every arm trains on every concept with training seeds ``0..N-1``; runs of one
concept and seed share the adapter's init, the data order, the noise and the timesteps, which is
what pairs them.

**Runs.** Each run is :func:`cat_engine.cat.demo.train_and_score` (``cat-engine train``, then
``cat-engine eval`` with ``--eval-prompts`` templates x ``--eval-seeds`` sampling seeds, toy-world
CLIP). A run is appended to ``WORK/runs.jsonl`` when it finishes; a rerun reuses a logged run only
when its concept, seed, arm and shared settings (the model's weights, lr, rank, eval prompts,
sampling seeds and DDIM steps) are all identical, so an interrupted experiment continues where it
stopped (the runs in progress start again). ``--processes N`` runs N worker processes of
``--threads`` threads each (default 1 with several processes).

**Record.** ``--results`` summarises every run logged in WORK with this invocation's shared
settings, concepts and seeds, whichever invocation made it, so successive invocations on one work
folder (a sweep, then its follow-ups) build one record; each invocation's command is kept in
``WORK/commands.jsonl`` and listed there. ``--record-only`` writes the record of the runs logged so
far without running any (while the experiment runs in another process, say); the runs still to do
are listed in it as ``missing_runs``. The statistics, the decision rule and the plot are in
:mod:`cat_engine.cat.experiment_report`; ``--plot`` draws the weight sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cat_engine.cat import demo
from cat_engine.cat.captions import PLAIN_MODES
from cat_engine.engine.builtin import BUILTIN_NAME
from cat_engine.engine.builtin_clip import BUILTIN_CLIP_NAME
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import write_text_atomically

METRICS = demo.METRICS  # what each run logs
RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"
DEFAULT_RESULTS = RESULTS_DIR / "toyworld_experiment.json"
RUNS_FILE, COMMANDS_FILE = "runs.jsonl", "commands.jsonl"


@dataclass(frozen=True)
class Arm:
    """One training setting; weight 0 (plain LoRA) is kept in one canonical form (:meth:`make`)."""

    cat_weight: float
    plain_mode: str = "class"
    steps: int = demo.DEFAULT_STEPS
    cat_every: int = 1

    @classmethod
    def make(
        cls, cat_weight: float, plain_mode: str = "class", steps: int = demo.DEFAULT_STEPS, cat_every: int = 1
    ):
        if cat_weight == 0:  # neither the plain caption nor cat-every changes plain LoRA
            return cls(0.0, "class", int(steps), 1)
        return cls(float(cat_weight), plain_mode, int(steps), int(cat_every))

    @classmethod
    def of(cls, row: dict) -> Arm:
        return cls.make(row["cat_weight"], row["plain_mode"], row["steps"], row["cat_every"])

    @property
    def lora(self) -> bool:
        return self.cat_weight == 0

    def baseline(self) -> Arm:
        """Plain LoRA with this arm's budget: what this arm is paired with."""
        return Arm.make(0.0, steps=self.steps)

    def reference(self) -> Arm:
        """This weight and budget with the default plain mode and the CAT term on every step."""
        return Arm.make(self.cat_weight, "class", self.steps, 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sort_key(self) -> tuple:
        return (self.steps, self.plain_mode != "class", self.plain_mode, self.cat_every, self.cat_weight)

    def label(self) -> str:
        if self.lora:
            text = "LoRA"
        else:
            text = f"CAT {self.cat_weight:g}"
            text += "" if self.plain_mode == "class" else f", plain {self.plain_mode}"
            text += "" if self.cat_every == 1 else f", every {self.cat_every}"
        return f"{text} ({self.steps} steps)"

    def folder(self) -> str:
        return f"w{self.cat_weight:g}-{self.plain_mode}-s{self.steps}-k{self.cat_every}"


def model_fingerprint() -> str:
    """The built-in model and CLIP's name and a hash of their weights."""
    from cat_engine.engine.builtin import builtin_model_dir
    from cat_engine.engine.builtin_clip import builtin_clip_dir

    digest = hashlib.sha256()
    for folder in (builtin_model_dir(), builtin_clip_dir()):
        for path in sorted(folder.rglob("*.safetensors")):
            digest.update(path.read_bytes())
    return f"{BUILTIN_NAME}+{BUILTIN_CLIP_NAME}:{digest.hexdigest()[:12]}"


def shared_setup(args) -> dict:
    """What a logged run depends on besides concept, seed and arm: a run is reused only if equal."""
    return {
        "model": model_fingerprint(),
        "lr": args.lr,
        "rank": args.rank,
        "eval_prompts": demo.eval_templates(args.eval_prompts),
        "eval_seeds": args.eval_seeds,
        "eval_steps": args.eval_steps,
        "eval_seed_stride": args.eval_seed_stride,
    }


def arms_of(args) -> list[Arm]:
    """The grid of the lists given, each arm once, with the LoRA baseline of every budget."""
    arms = {
        Arm.make(w, m, s, k)
        for w in args.cat_weights
        for m in args.plain_modes
        for s in args.steps
        for k in args.cat_every
    }
    arms |= {Arm.make(0.0, steps=s) for s in args.steps}
    return sorted(arms, key=Arm.sort_key)


# ------------------------------------------------------------------------------------------ runs
def run_one(task: dict) -> dict:
    """Train and score one (concept, seed, arm) in a fresh folder; the row that goes to runs.jsonl."""
    arm, setup = Arm(**task["arm"]), task["setup"]
    folder = Path(task["folder"])
    shutil.rmtree(folder, ignore_errors=True)  # a run interrupted before: start it again
    report = demo.train_and_score(
        task["concept"],
        arm.cat_weight,
        task["seed"],
        folder,
        steps=arm.steps,
        lr=setup["lr"],
        rank=setup["rank"],
        eval_seeds=setup["eval_seeds"],
        eval_steps=setup["eval_steps"],
        plain_mode=arm.plain_mode,
        cat_every=arm.cat_every,
        templates=setup["eval_prompts"],
        prompt_seed_stride=setup["eval_seed_stride"],
    )
    shutil.rmtree(folder / "adapter" / "checkpoints", ignore_errors=True)  # the LoRA file is kept
    return {
        "concept": task["concept"],
        "seed": task["seed"],
        **arm.to_dict(),
        "setup": setup,
        **{m: report[m] for m in METRICS},
        "train_seconds": report["train_seconds"],
        "eval_seconds": report["eval_seconds"],
        "torch_threads": report["torch_threads"],
    }


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def read_log(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a line cut short by an interruption is skipped, with a note."""
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{path}:{n}: not a complete JSON line (an interrupted write?); ignoring it", flush=True)
    return rows


def append_log(path: Path, row: dict) -> dict:
    """Append ``row`` with the time it was logged; returns it as logged."""
    row = row | {"logged_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row


def execute(tasks: list[dict], processes: int, threads: int, log_path: Path, on_row) -> None:
    """Run ``tasks`` (in this process, or in a pool of worker processes), logging each row as it comes."""
    if processes <= 1:
        for task in tasks:
            on_row(append_log(log_path, run_one(task)))
        return
    import multiprocessing

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the workers' libraries read it as they start
    with multiprocessing.get_context("spawn").Pool(processes, _worker_init, (threads,)) as pool:
        for row in pool.imap_unordered(run_one, tasks):
            on_row(append_log(log_path, row))


# ------------------------------------------------------------------------------------------- CLI
def _list(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cat_engine.cat.experiment", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add(
        "--concepts",
        default=",".join(demo.concept_names()),
        help="comma-separated built-in concepts (default: all)",
    )
    add(
        "--seeds", type=int, default=3, help="training seeds 0..N-1 per concept and arm (default %(default)s)"
    )
    add("--cat-weights", type=_list(float), default=[0.0, 1.0], help="lambdas, 0 = plain LoRA (default 0,1)")
    add(
        "--plain-modes",
        type=_list(str),
        default=["class"],
        help="plain captions of the CAT term (default class)",
    )
    add(
        "--steps",
        type=_list(int),
        default=[demo.DEFAULT_STEPS],
        help="training budgets (default %(default)s)",
    )
    add("--cat-every", type=_list(int), default=[1], help="k: the CAT term on every k-th step (default 1)")
    add("--lr", type=float, default=demo.DEFAULT_LR, help="learning rate (default %(default)s)")
    add("--rank", type=int, default=demo.DEFAULT_RANK, help="LoRA rank (default %(default)s)")
    add(
        "--eval-prompts",
        type=int,
        default=demo.DEFAULT_EVAL_PROMPTS,
        help="eval prompt templates: the first N of demo.EVAL_TEMPLATES (default %(default)s)",
    )
    add(
        "--eval-seeds",
        type=int,
        default=demo.DEFAULT_EVAL_SEEDS,
        help="sampling seeds per prompt (default %(default)s)",
    )
    add("--eval-steps", type=int, default=demo.DEFAULT_EVAL_STEPS, help="DDIM steps (default %(default)s)")
    add(
        "--eval-seed-stride",
        type=int,
        default=demo.DEFAULT_EVAL_SEED_STRIDE,
        help="eval prompt p samples seeds + p x STRIDE (cat-engine eval --prompt-seed-stride; default %(default)s)",
    )
    add("--work", type=Path, default=Path("cat-experiment"), help="run folders, runs.jsonl, commands.jsonl")
    add("--results", type=Path, default=DEFAULT_RESULTS, help="the record (JSON; default %(default)s)")
    add("--plot", type=Path, default=None, help="also draw the metrics against the CAT weight (PNG)")
    add("--processes", type=int, default=1, help="worker processes (default 1: this one)")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: 1 with --processes > 1, else torch's)",
    )
    add("--dry-run", action="store_true", help="list the runs still to do and stop")
    add(
        "--record-only",
        action="store_true",
        help="write the record of the runs logged so far and stop (partial while runs are missing, e.g. "
        "while the experiment runs in another process)",
    )
    args = parser.parse_args(argv)
    args.concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    for concept in args.concepts:
        demo.concept_folder(concept)
    checks = [
        (args.seeds >= 1, "--seeds must be >= 1"),
        (all(w >= 0 for w in args.cat_weights), "--cat-weights must be >= 0"),
        (
            all(m in PLAIN_MODES for m in args.plain_modes),
            f"--plain-modes must be among {', '.join(PLAIN_MODES)}",
        ),
        (all(s >= 1 for s in args.steps), "--steps must be >= 1"),
        (all(k >= 1 for k in args.cat_every), "--cat-every must be >= 1"),
        (
            1 <= args.eval_prompts <= len(demo.EVAL_TEMPLATES),
            f"--eval-prompts must be 1..{len(demo.EVAL_TEMPLATES)}",
        ),
        (args.eval_seeds >= 1 and args.eval_steps >= 1, "--eval-seeds and --eval-steps must be >= 1"),
        (args.eval_seed_stride >= 0, "--eval-seed-stride must be >= 0"),
        (args.processes >= 1, "--processes must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise CatEngineError(message)
    if args.threads is None and args.processes > 1:
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except CatEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from cat_engine.cat import experiment_report as report

    if args.threads:
        torch.set_num_threads(args.threads)
    command = "OMP_NUM_THREADS=1 python -m cat_engine.cat.experiment " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.work.mkdir(parents=True, exist_ok=True)
    log_path = args.work / RUNS_FILE
    setup = shared_setup(args)
    logged = read_log(log_path)
    rows = [r for r in logged if r.get("setup") == setup]
    if len(rows) < len(logged):  # another model or other settings: those runs do not count here
        print(
            f"{log_path}: {len(logged) - len(rows)} logged runs have another model or settings; ignoring them",
            flush=True,
        )
    done = {(r["concept"], r["seed"], Arm.of(r)) for r in rows}
    arms = arms_of(args)
    tasks = [
        {
            "concept": concept,
            "seed": seed,
            "arm": arm.to_dict(),
            "setup": setup,
            "folder": str(args.work / concept / f"{arm.folder()}-seed{seed}"),
        }
        for seed in range(args.seeds)  # seed by seed: an interrupted sweep leaves whole pairs
        for concept in args.concepts
        for arm in arms
        if (concept, seed, arm) not in done
    ]
    print(
        f"{len(arms)} arms x {len(args.concepts)} concepts x {args.seeds} seeds: "
        f"{len(tasks)} runs to do, {len(arms) * len(args.concepts) * args.seeds - len(tasks)} logged",
        flush=True,
    )
    if args.dry_run:
        for task in tasks:
            print(f"  {task['concept']} seed {task['seed']} {Arm(**task['arm']).label()}")
        return 0
    missing = [] if not args.record_only else tasks
    tasks = [] if args.record_only else tasks
    if tasks:
        append_log(
            args.work / COMMANDS_FILE, {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        )
    t0 = time.perf_counter()

    def on_row(row: dict) -> None:
        rows.append(row)
        print(
            f"{row['concept']} seed {row['seed']} {Arm.of(row).label()}: KPS {row['kps']:.4f} "
            f"ID {row['identity']:.4f} PRES {row['preservation']:.4f} LEAK {row['leakage']:+.4f} "
            f"({row['train_seconds']:.0f} s + {row['eval_seconds']:.0f} s)",
            flush=True,
        )

    try:
        execute(tasks, args.processes, args.threads or torch.get_num_threads(), log_path, on_row)
    except KeyboardInterrupt:
        print(f"interrupted: {len(rows)} runs logged in {log_path}; the same command continues", flush=True)
        return 130
    chosen = [r for r in rows if r["concept"] in args.concepts and r["seed"] < args.seeds]
    result = report.record(chosen, args.concepts, args.seeds)
    result |= {
        "command": command,
        "commands": read_log(args.work / COMMANDS_FILE),
        "model": f"{BUILTIN_NAME} (engine/assets/toyworld)",
        "embedding": f"{BUILTIN_CLIP_NAME} (engine/assets/toyworld_clip)",
        "shared_setup": setup,
        "missing_runs": [
            {"concept": t["concept"], "seed": t["seed"], "label": Arm(**t["arm"]).label()} for t in missing
        ],
        "seconds_this_invocation": round(time.perf_counter() - t0, 1),
        "processes": args.processes,
        "threads_per_process": args.threads or torch.get_num_threads(),
    }
    write_text_atomically(args.results, json.dumps(result, indent=1) + "\n")
    if args.plot:
        report.plot(result, args.plot)
    print(result["table_markdown"])
    partial = f" (partial: {len(missing)} runs still to do)" if missing else ""
    print(f"wrote {args.results}" + (f" and {args.plot}" if args.plot else "") + partial)
    return 0


if __name__ == "__main__":
    sys.exit(main())
