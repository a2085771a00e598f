"""The toy-world experiment: runs are logged, reused on a rerun, and never reused across settings."""

import json

from cat_engine.cat import experiment

TINY = ["--concepts", "green-star", "--seeds", "1", "--eval-seeds", "1", "--eval-steps", "2", "--threads", "1"]


def test_rerun_reuses_logged_runs_only_for_the_same_setup(tmp_path, capsys):
    results = tmp_path / "results.json"
    argv = [*TINY, "--steps", "2", "--work", str(tmp_path / "work"), "--results", str(results)]
    assert experiment.main(argv) == 0
    first = json.loads(results.read_text())
    assert [(r["concept"], r["method"]) for r in first["runs"]] == [("green-star", "lora"), ("green-star", "cat")]
    assert first["runs"][0]["cat_weight"] == 0.0 and first["runs"][1]["cat_weight"] == 1.0
    paired = first["summary"]["all"]["cat_minus_lora"]["kps"][0]
    assert abs(paired - (first["runs"][1]["kps"] - first["runs"][0]["kps"])) < 1e-12
    capsys.readouterr()

    assert experiment.main(argv) == 0  # everything logged: nothing trains again
    out = capsys.readouterr().out
    assert "seed 0: KPS" not in out
    assert json.loads(results.read_text())["runs"] == first["runs"]

    argv[argv.index("--steps") + 1] = "3"  # other settings: the logged runs do not count
    assert experiment.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 logged runs have another model or settings" in out and out.count("seed 0: KPS") == 2
    assert all(r["setup"]["steps"] == 3 for r in json.loads(results.read_text())["runs"])
