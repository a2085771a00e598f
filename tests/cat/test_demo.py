"""``cat-engine demo`` end to end on a built-in concept, with tiny settings."""

import json

import pytest

from cat_engine.cli import main


def test_demo_writes_report_and_grid(tmp_path):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--output",
            str(out),
            "--steps",
            "2",
            "--eval-seeds",
            "1",
            "--eval-steps",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"lora", "cat"}
    assert report["methods"]["lora"]["train"]["cat_weight"] == 0.0
    from cat_engine.cat.demo import DEFAULT_CAT_WEIGHT  # what the committed sweep's rule chose

    assert report["methods"]["cat"]["train"]["cat_weight"] == DEFAULT_CAT_WEIGHT
    for method in report["methods"].values():
        for key in ("kps", "identity", "preservation", "leakage"):
            assert isinstance(method[key], float)
    assert report["embedding"] == "toyworld-clip-v2" and report["model"] == "toyworld-v2"
    assert (out / "grid.png").stat().st_size > 0


def test_demo_unknown_concept_is_one_clear_line(tmp_path, capsys):
    code = main(["demo", "--concept", "nope", "--output", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--concept nope: not a built-in concept" in err and "green-star" in err


@pytest.mark.parametrize("flag", ["--steps", "--eval-seeds", "--eval-steps"])
def test_demo_rejects_non_positive_counts(tmp_path, flag):
    assert main(["demo", flag, "0", "--output", str(tmp_path / "x")]) == 2


def _fake_sweep(path):
    """A sweep record of made-up runs: 2 concepts x 3 seeds, LoRA and CAT 1 at the demo's budget."""
    from cat_engine.cat import demo, experiment_report

    rows = []
    for concept in ("green-star", "spotted-fish"):
        for seed in range(3):
            for weight in (0.0, 1.0):
                metrics = {m: 0.5 + 0.1 * weight + 0.01 * seed for m in demo.METRICS}
                arm = {
                    "cat_weight": weight,
                    "plain_mode": "class",
                    "steps": demo.DEFAULT_STEPS,
                    "cat_every": 1,
                }
                rows.append({"concept": concept, "seed": seed, **arm, **metrics})
    record = experiment_report.record(rows, ["green-star", "spotted-fish"], 3)
    record["shared_setup"] = {}
    path.write_text(json.dumps(record))
    return record


def test_demo_prints_the_sweep_intervals_beside_its_one_seed(tmp_path):
    import argparse

    from cat_engine.cat import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--cat-weight", "1"])
    diff = {m: 0.05 for m in demo.METRICS}
    record = _fake_sweep(tmp_path / "sweep.json")
    lines = demo.sweep_lines(tmp_path / "sweep.json", args, diff)
    assert lines[0].startswith("this run (one training seed): CAT - LoRA kps +0.050")
    assert "2 concepts x 3 training seeds" in lines[1]
    assert record["summary"][1]["metrics"]["kps"]["seed_sd"] == pytest.approx(0.01)  # 0.6, 0.61, 0.62
    kps = record["summary"][1]["vs_lora"]["kps"]
    assert f"kps {kps['mean']:+.3f} [{kps['ci'][0]:+.3f}, {kps['ci'][1]:+.3f}]" in lines[2]
    assert lines[3].startswith("  green-star only: kps +0.100")
    assert "eval settings differ" in lines[-1]
    args = parser.parse_args(["--cat-weight", "0.5"])
    assert "no CAT arm with these settings" in demo.sweep_lines(tmp_path / "sweep.json", args, diff)[1]
    assert "no committed sweep" in demo.sweep_lines(tmp_path / "missing.json", args, diff)[1]
