"""The --cat-every timing on a tiny budget: every candidate timed in every round, the record written."""

import json

from cat_engine.bench import cat_every


def test_candidates_are_timed_round_robin_and_recorded(tmp_path):
    results = tmp_path / "timing.json"
    argv = ["--every", "1,2", "--rounds", "2", "--block", "2", "--results", str(results)]
    assert cat_every.main(argv) == 0
    record = json.loads(results.read_text())
    assert list(record["seconds_per_step"]) == ["lora", "cat_every_1", "cat_every_2"]
    assert all(len(v) == 2 and min(v) > 0 for v in record["blocks"].values())
    assert record["extra_vs_lora"]["lora"] == 0.0 and record["threads"] == 1
    assert "--every 1,2" in record["command"]
