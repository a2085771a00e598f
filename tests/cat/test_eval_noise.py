"""The noise study on a tiny budget: scores from cached embeddings equal an eval run, spreads are written."""

import json

import pytest
import torch

from cat_engine.cat import demo, eval_noise
from cat_engine.cat.eval import EvalConfig, evaluate

TINY = [
    "--steps", "2", "--train-seeds", "2", "--prompts", "2", "--pool-seeds", "4", "--settings-prompts", "1,2",
    "--settings-seeds", "1,2", "--eval-steps", "2", "--chunk", "3", "--no-timing",
]  # fmt: skip


def test_spreads_from_cached_embeddings_match_an_eval_run(tmp_path):
    results = tmp_path / "noise.json"
    argv = [*TINY, "--work", str(tmp_path / "work"), "--results", str(results)]
    assert eval_noise.main(argv) == 0
    record = json.loads(results.read_text())
    assert [(r["prompts"], r["seeds"], r["eval_sets"]) for r in record["settings"]] == [
        (1, 1, 4),
        (1, 2, 2),
        (2, 1, 4),
        (2, 2, 2),
    ]
    for row in record["settings"]:
        assert row["kps"]["eval_sd"] >= 0 and len(row["train_seeds_kps"]) == 2

    # The cached pool scored on seeds 0..1 is what cat-engine eval gives for that adapter and setting.
    pool = torch.load(tmp_path / "work" / "pool-seed0-stride1000.pt")
    assert sorted(pool["by_seed"]) == [0, 1, 2, 3]  # made in two chunks, the second one seed
    folder, _ = demo.concept_folder("green-star")
    lora = tmp_path / "work" / "adapter-seed0"
    config = EvalConfig(
        lora=str(lora),
        refs=str(folder),
        templates=demo.eval_templates(2),
        seeds=2,
        steps=2,
        prompt_seed_stride=1000,
    )  # the pool's stride (eval_noise's default; the file name says it)
    report = evaluate(config, progress=False)
    scored = eval_noise.score(pool, 2, [0, 1])
    for key in ("kps", "identity", "preservation", "leakage", "prompt_similarity"):
        assert scored[key] == pytest.approx(getattr(report, key), abs=1e-5), key
    assert record["settings"][3]["train_seeds_kps"][0] == pytest.approx(report.kps, abs=1e-5)

    assert eval_noise.main([*argv, "--eval-steps", "3"]) == 2  # the cache was made with 2 DDIM steps
