"""``cat-engine demo`` end to end on a built-in concept, with tiny settings."""

import json

import pytest

from cat_engine.cli import main


def test_demo_writes_report_and_grid(tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out), "--steps", "2", "--eval-seeds", "1", "--eval-steps", "2",
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"lora", "cat"}
    assert report["methods"]["lora"]["train"]["cat_weight"] == 0.0
    assert report["methods"]["cat"]["train"]["cat_weight"] == 1.0
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
