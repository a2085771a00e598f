"""How much of a KPS difference is the evaluation's own noise, and how much is training's.

    OMP_NUM_THREADS=1 python -m cat_engine.cat.eval_noise --work cat-noise

One concept and one training setting (default: the demo's CAT adapter on ``green-star``):

- **the evaluation's spread**: adapter seed 0 is sampled with ``--pool-seeds`` sampling seeds on
  each of ``--prompts`` templates (:data:`cat_engine.cat.demo.EVAL_TEMPLATES`); for a setting of
  P prompts x S seeds, the pool gives ``pool // S`` evaluations on disjoint seed sets (seeds
  ``jS .. jS+S-1``), and their sample standard deviation is what the evaluation alone adds;
- **the training's spread**: adapters of training seeds ``0..T-1``, each scored on the same prompts
  and seeds (``0..S-1``); their standard deviation holds both, and ``sqrt(total^2 - eval^2)`` is
  the part that is the training's.

Images are generated once and embedded with the toy CLIP; every setting's scores come from subsets
of those embeddings (cached in ``WORK``, so an interrupted study continues).

A standard deviation from a handful of sets is itself uncertain by a third or so, so the
recommendation rests on a fit: for each P, the spread of one seed's worth of images,
``sd_1(P)^2 = sum (sets - 1) S sd_S^2 / sum (sets - 1)`` over the measured S (disjoint seeds are
independent, so ``sd_S = sd_1 / sqrt(S)``), then the fewest seeds ``S = ceil((sd_1 / target)^2)``;
the recommendation is the P with the fewest jobs P x S. Its cost is measured with one timed
``cat-engine eval`` run of that setting on adapter 0 (``--threads``, default 1). Writes
``--results`` (default ``bench/results/toyworld_eval_noise.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cat_engine.cat import demo, stats
from cat_engine.cat.kps import all_metrics
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import write_atomically, write_text_atomically

DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "toyworld_eval_noise.json"
SHOWN = ("kps", "identity", "preservation", "leakage")


def train_adapter(args, seed: int) -> Path:
    """The adapter of training seed ``seed`` (trained once; reused when its LoRA file exists)."""
    from cat_engine.cat.config import TrainConfig
    from cat_engine.cat.train import train
    from cat_engine.engine.lora import LORA_WEIGHT_NAME

    out = args.work / f"adapter-seed{seed}"
    if (out / LORA_WEIGHT_NAME).is_file():
        return out / LORA_WEIGHT_NAME
    folder, class_word = demo.concept_folder(args.concept)
    config = TrainConfig(
        data=str(folder),
        class_word=class_word,
        cat_weight=args.cat_weight,
        steps=args.steps,
        lr=demo.DEFAULT_LR,
        rank=demo.DEFAULT_RANK,
        seed=seed,
        output=str(out),
        save_every=0,
    )
    return train(config.validate(), progress=False)


def embed(args, lora: Path, seeds: list[int], cache: Path) -> dict:
    """Embeddings of G_tok, G_ada and G_base for every template and seed, ``{seed: {set: [P, D]}}``.

    Cached in ``cache``; only seeds not there yet are generated, in chunks saved as they finish.
    """
    from cat_engine.cat import eval as kps_eval
    from cat_engine.engine import distributed as dist

    templates = demo.eval_templates(args.prompts)
    stride = args.prompt_seed_stride
    state = torch.load(cache) if cache.exists() else {"by_seed": {}}
    if state.get("templates") not in (None, templates) or state.get("steps") not in (None, args.eval_steps):
        raise CatEngineError(f"{cache}: made with other prompts or DDIM steps; use another --work")
    missing = [s for s in seeds if s not in state["by_seed"]]
    if missing:
        folder, _ = demo.concept_folder(args.concept)
        config = kps_eval.EvalConfig(
            lora=str(lora), refs=str(folder), templates=templates, steps=args.eval_steps
        )
        config.validate()
        meta = kps_eval.read_lora_metadata(lora)
        model, settings, embedder = kps_eval.prepare_models(config, None, torch.device("cpu"))
        first = kps_eval.make_jobs(templates, [0], meta["token"], meta["class_word"])
        state |= {
            "templates": templates,
            "steps": args.eval_steps,
            "refs": embedder.images(kps_eval.read_images(folder)),
            "texts": embedder.texts([job.plain_prompt for job in first]),
        }
        for i in range(0, len(missing), args.chunk):
            chunk = missing[i : i + args.chunk]
            t0 = time.perf_counter()
            jobs = kps_eval.make_jobs(templates, chunk, meta["token"], meta["class_word"], stride)
            emb = kps_eval.generate(model, jobs, settings, embedder, dist.SINGLE, False, lambda j: False)
            for k, seed in enumerate(chunk):  # jobs are template-major: row p * len(chunk) + k
                rows = torch.arange(len(templates)) * len(chunk) + k
                state["by_seed"][seed] = {name: emb[name][rows].clone() for name in ("tok", "ada", "base")}
            write_atomically(cache, lambda p: torch.save(state, p))
            print(
                f"{cache.name}: seeds {chunk[0]}..{chunk[-1]} in {time.perf_counter() - t0:.0f} s "
                f"({len(state['by_seed'])} seeds cached)",
                flush=True,
            )
    return state


def score(state: dict, prompts: int, seeds: list[int]) -> dict:
    """kps-v1 metrics of the first ``prompts`` templates x ``seeds``, from cached embeddings."""
    sets = {
        name: torch.stack([state["by_seed"][s][name][:prompts] for s in seeds], dim=1).flatten(0, 1)
        for name in ("tok", "ada", "base")
    }
    texts = state["texts"][:prompts].repeat_interleave(len(seeds), dim=0)
    return all_metrics(sets["tok"], sets["ada"], sets["base"], state["refs"], texts)


def spreads(pool: dict, adapters: list[dict], prompts: int, seeds: int) -> dict:
    """The evaluation's and the training's standard deviations of each metric at P prompts x S seeds."""
    n_sets = len(pool["by_seed"]) // seeds
    evals = [score(pool, prompts, list(range(j * seeds, (j + 1) * seeds))) for j in range(n_sets)]
    trained = [score(a, prompts, list(range(seeds))) for a in adapters]
    out = {"prompts": prompts, "seeds": seeds, "images_per_set": 3 * prompts * seeds, "eval_sets": n_sets}
    for m in SHOWN:
        eval_sd = stats.sample_std([e[m] for e in evals])
        total_sd = stats.sample_std([t[m] for t in trained])
        out[m] = {  # None where there are too few sets or seeds for a standard deviation
            "eval_sd": _number(eval_sd),
            "train_seeds_sd": _number(total_sd),
            "training_part_sd": _number(math.sqrt(max(total_sd**2 - eval_sd**2, 0.0))),
        }
    out["train_seeds_kps"] = [t["kps"] for t in trained]
    return out


def fit(rows: list[dict], prompts: int, target: float) -> dict:
    """One seed's spread of KPS at ``prompts`` (pooled over the measured S) and the seeds for ``target``."""
    mine = [r for r in rows if r["prompts"] == prompts and r["kps"]["eval_sd"] is not None]
    weights = [r["eval_sets"] - 1 for r in mine]
    variance = sum(w * r["seeds"] * r["kps"]["eval_sd"] ** 2 for w, r in zip(weights, mine)) / sum(weights)
    seeds = max(1, math.ceil(variance / target**2))
    return {
        "prompts": prompts,
        "per_seed_sd": math.sqrt(variance),
        "seeds": seeds,
        "jobs": prompts * seeds,
        "fitted_eval_sd": {r["seeds"]: math.sqrt(variance / r["seeds"]) for r in mine},
    }


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def _show(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def timed_eval(args, lora: Path, prompts: int, seeds: int) -> float:
    """Seconds of one ``cat-engine eval`` of P prompts x S seeds (models loaded, images, CLIP, scores)."""
    from cat_engine.cat.eval import EvalConfig, evaluate

    folder, _ = demo.concept_folder(args.concept)
    t0 = time.perf_counter()
    templates = demo.eval_templates(prompts)
    evaluate(
        EvalConfig(
            lora=str(lora),
            refs=str(folder),
            templates=templates,
            seeds=seeds,
            steps=args.eval_steps,
            prompt_seed_stride=args.prompt_seed_stride,
        ),
        progress=False,
    )
    return time.perf_counter() - t0


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cat_engine.cat.eval_noise", description=__doc__.splitlines()[0]
    )
    add = parser.add_argument
    add("--concept", default=demo.DEFAULT_CONCEPT)
    add("--cat-weight", type=float, default=1.0, help="the adapters' lambda (default %(default)s)")
    add("--steps", type=int, default=demo.DEFAULT_STEPS, help="training steps (default %(default)s)")
    add("--train-seeds", type=int, default=6, help="adapters of training seeds 0..T-1 (default %(default)s)")
    add("--prompts", type=int, default=len(demo.EVAL_TEMPLATES), help="templates generated (default all)")
    add("--pool-seeds", type=int, default=96, help="sampling seeds of adapter 0 (default %(default)s)")
    add("--settings-prompts", type=_ints, default=[4, 8, 16], help="P values scored (default 4,8,16)")
    add("--settings-seeds", type=_ints, default=[4, 8, 16], help="S values scored (default 4,8,16)")
    add("--eval-steps", type=int, default=demo.DEFAULT_EVAL_STEPS)
    add(
        "--prompt-seed-stride",
        type=int,
        default=1000,
        help="prompt p samples seeds + p x STRIDE: 0 (every prompt the same seeds) or >= --pool-seeds (default %(default)s)",
    )
    add("--target", type=float, default=0.01, help="eval spread of KPS to reach (default %(default)s)")
    add("--chunk", type=int, default=8, help="seeds generated per cached chunk (default %(default)s)")
    add("--only", choices=("pool", "adapters"), default=None, help="only generate that part (two processes)")
    add("--no-timing", action="store_true", help="skip the timed eval of the recommended setting")
    add("--threads", type=int, default=1)
    add("--work", type=Path, default=Path("cat-noise"))
    add("--results", type=Path, default=DEFAULT_RESULTS)
    args = parser.parse_args(argv)
    try:
        return study(
            args,
            "OMP_NUM_THREADS=1 python -m cat_engine.cat.eval_noise "
            + " ".join(sys.argv[1:] if argv is None else argv),
        )
    except CatEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def study(args, command: str) -> int:
    s_max = max(args.settings_seeds)
    if not (1 <= args.prompts <= len(demo.EVAL_TEMPLATES)) or max(args.settings_prompts) > args.prompts:
        raise CatEngineError(
            f"--prompts and --settings-prompts must be within 1..{len(demo.EVAL_TEMPLATES)}, the larger first"
        )
    if args.pool_seeds < 2 * s_max:
        raise CatEngineError("--pool-seeds must hold at least two sets of the largest --settings-seeds")
    if 0 < args.prompt_seed_stride < args.pool_seeds:
        raise CatEngineError(
            "--prompt-seed-stride must be 0 or at least --pool-seeds (no seed shared by two prompts)"
        )
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Two processes may share the work: --only pool (adapter 0, every pool seed), --only adapters
    # (the other training seeds); neither touches the other's files.
    if args.only != "adapters":
        pool = embed(
            args,
            train_adapter(args, 0),
            list(range(args.pool_seeds)),
            args.work / f"pool-seed0-stride{args.prompt_seed_stride}.pt",
        )
    others = []
    if args.only != "pool":
        for seed in range(1, args.train_seeds):
            others.append(
                embed(
                    args,
                    train_adapter(args, seed),
                    list(range(s_max)),
                    args.work / f"emb-seed{seed}-stride{args.prompt_seed_stride}.pt",
                )
            )
    if args.only:
        return 0
    adapters = [pool, *others]  # adapter 0's scores on seeds 0..S-1 come from the pool
    rows = [spreads(pool, adapters, p, s) for p in args.settings_prompts for s in args.settings_seeds]
    fits = {p: fit(rows, p, args.target) for p in args.settings_prompts}
    chosen = min(fits.values(), key=lambda f: (f["jobs"], -f["prompts"]))
    seconds = None
    if not args.no_timing:
        seconds = round(timed_eval(args, train_adapter(args, 0), chosen["prompts"], chosen["seeds"]), 1)
    result = {
        "command": command,
        "what": f"{args.concept}, cat-weight {args.cat_weight:g}, {args.steps} steps (lr {demo.DEFAULT_LR}, rank "
        f"{demo.DEFAULT_RANK}); eval {args.eval_steps} DDIM steps, guidance 7.5, toy CLIP. eval_sd: sample std of "
        "one adapter's metric over disjoint sampling-seed sets; train_seeds_sd: over training seeds 0..T-1 "
        "scored on seeds 0..S-1; training_part_sd = sqrt(train^2 - eval^2)",
        "templates": demo.eval_templates(args.prompts),
        "prompt_seed_stride": args.prompt_seed_stride,
        "pool_seeds": args.pool_seeds,
        "train_seeds": args.train_seeds,
        "target_eval_sd": args.target,
        "settings": rows,
        "fit": list(fits.values()),
        "recommended": {"prompts": chosen["prompts"], "seeds": chosen["seeds"]},
        "recommended_eval_seconds": seconds,
        "timing_threads": args.threads,
        "seconds_this_invocation": round(time.perf_counter() - t0, 1),
    }
    write_text_atomically(args.results, json.dumps(result, indent=1) + "\n")
    print(f"{'P':>3} {'S':>3} {'sets':>5} " + " ".join(f"{m + ' eval/train sd':>28}" for m in SHOWN))
    for r in rows:
        print(
            f"{r['prompts']:3d} {r['seeds']:3d} {r['eval_sets']:5d} "
            + " ".join(f"{_show(r[m]['eval_sd']):>13s} / {_show(r[m]['train_seeds_sd']):<12s}" for m in SHOWN)
        )
    for f in fits.values():
        print(
            f"P {f['prompts']:2d}: one seed's KPS sd {f['per_seed_sd']:.4f} -> {f['seeds']} seeds, {f['jobs']} jobs"
        )
    print(f"recommended: {result['recommended']} ({seconds} s per eval); wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
