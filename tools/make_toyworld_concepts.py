"""Draw the toy world's built-in concept sets (5 images each), e.g. ``cat/assets/concepts/green-star/``.

Each concept is one specific object the pretraining data never shows (a two-colour pattern the
world does not use, see ``cat_engine.cat.toyworld.CONCEPTS``), on varied backgrounds and positions,
with a caption file per image (``a photo of sks star on a blue background``). Deterministic::

    python tools/make_toyworld_concepts.py             # rewrite the committed sets
    python tools/make_toyworld_concepts.py --out DIR   # write DIR/<name>/ instead

``--check`` asks whether each concept can be learnt at the demo's budget: it trains a plain LoRA
(``--cat-weight 0``, seed 0, the demo's steps, lr and rank) on each committed set and compares the
adapter's identity on the token prompts with the base model's on the very same prompts and seeds
(the demo's eval: 4 prompts x 4 seeds, 20 DDIM steps). A concept the token does not bring clearly
above the base model cannot show what CAT preserves. Writes ``bench/results/toyworld_concepts.json``::

    OMP_NUM_THREADS=1 python tools/make_toyworld_concepts.py --check
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cat_engine.cat import toyworld as tw

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "cat" / "assets" / "concepts"
CHECK_RESULTS = ROOT / "bench" / "results" / "toyworld_concepts.json"


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


def base_identity(lora: Path, refs: Path, eval_seeds: int, eval_steps: int) -> dict:
    """Identity of the adapter and of the base model on the token prompts (same prompts and seeds).

    The base rows of a KPS job draw its plain prompt without the adapter; giving them the token
    prompt as their plain prompt makes them the base model's answer to the token prompt.
    """
    import torch

    from cat_engine.cat import eval as kps_eval
    from cat_engine.cat.kps import identity
    from cat_engine.cat.sampling import Job
    from cat_engine.engine import distributed as dist

    config = kps_eval.EvalConfig(
        lora=str(lora), refs=str(refs), seeds=eval_seeds, steps=eval_steps
    ).validate()
    meta = kps_eval.read_lora_metadata(kps_eval.lora_file(config.lora))
    model, settings, embedder = kps_eval.prepare_models(config, None, torch.device("cpu"))
    jobs = kps_eval.make_jobs(config.templates, list(range(eval_seeds)), meta["token"], meta["class_word"])
    jobs = [Job(j.token_prompt, j.token_prompt, j.seed) for j in jobs]
    emb = kps_eval.generate(model, jobs, settings, embedder, dist.SINGLE, False, lambda i: False)
    ref_emb = embedder.images(kps_eval.read_images(refs))
    return {"adapter": identity(emb["tok"], ref_emb), "base": identity(emb["base"], ref_emb)}


def check(concepts: list[str], results: Path) -> dict:
    """Train a plain LoRA on each concept at the demo's budget; its token identity against the base's."""
    import torch

    from cat_engine.cat import demo
    from cat_engine.cat.config import TrainConfig
    from cat_engine.cat.train import train

    eval_seeds, eval_steps = 4, 20
    rows = {}
    for name in concepts:
        folder, class_word = demo.concept_folder(name)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            config = TrainConfig(
                data=str(folder),
                class_word=class_word,
                cat_weight=0.0,
                steps=demo.DEFAULT_STEPS,
                lr=demo.DEFAULT_LR,
                rank=demo.DEFAULT_RANK,
                seed=0,
                output=str(Path(tmp) / "adapter"),
                save_every=0,
            )
            lora = train(config.validate(), progress=False)
            ids = base_identity(lora, folder, eval_seeds, eval_steps)
        rows[name] = {
            **ids,
            "gain": ids["adapter"] - ids["base"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{name}: identity adapter {ids['adapter']:.4f}, base {ids['base']:.4f}", flush=True)
    from cat_engine.engine.files import write_text_atomically

    record = {
        "command": "OMP_NUM_THREADS=1 python tools/make_toyworld_concepts.py --check",
        "what": "identity (toy CLIP) of the token prompts' images against the references: a plain LoRA "
        f"(seed 0, {demo.DEFAULT_STEPS} steps, lr {demo.DEFAULT_LR}, rank {demo.DEFAULT_RANK}) and the base model, "
        f"same prompts and sampling seeds ({eval_seeds} seeds x the eval's 4 prompts, {eval_steps} DDIM steps)",
        "torch_threads": torch.get_num_threads(),
        "concepts": rows,
    }
    write_text_atomically(results, json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="train a plain LoRA on each set and score it")
    parser.add_argument("--concepts", default=",".join(tw.CONCEPTS), help="with --check: which concepts")
    parser.add_argument("--results", type=Path, default=CHECK_RESULTS, help="with --check: the JSON to write")
    args = parser.parse_args()
    if args.check:
        check([c for c in args.concepts.split(",") if c], args.results)
        return
    for path in make(args.out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
