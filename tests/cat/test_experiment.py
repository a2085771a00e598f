"""The toy-world experiment on a tiny budget: arms from the lists, resume after an interrupt, reuse only
for identical settings, two worker processes, and the record (statistics, decision, plot)."""

import json

import pytest

from cat_engine.cat import experiment
from cat_engine.cat.experiment import Arm

TINY = [
    *("--concepts", "green-star", "--seeds", "1"),
    *("--eval-prompts", "2", "--eval-seeds", "1", "--eval-steps", "2", "--eval-seed-stride", "100"),
]
ARMS = ["--cat-weights", "0.5", "--cat-every", "1,2", "--steps", "2"]


def _argv(tmp_path, *extra):
    return [
        *TINY,
        *ARMS,
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "results.json"),
        *extra,
    ]


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """Three arms; the run of the second is interrupted, then the same command finishes the rest."""
    tmp_path = tmp_path_factory.mktemp("experiment")
    calls, original = [], experiment.run_one

    def interrupt_second(task):
        calls.append(Arm(**task["arm"]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(task)

    experiment.run_one = interrupt_second
    try:
        first = experiment.main(_argv(tmp_path, "--threads", "1"))
        logged = experiment.read_log(tmp_path / "work" / experiment.RUNS_FILE)
        assert experiment.main(_argv(tmp_path, "--record-only")) == 0  # runs nothing
        partial = json.loads((tmp_path / "results.json").read_text())
        second = experiment.main(_argv(tmp_path, "--threads", "1"))
    finally:
        experiment.run_one = original
    return tmp_path, first, logged, second, calls, partial


def test_arms_are_the_grid_of_the_lists_with_one_lora_per_budget():
    args = experiment.parse_args(["--cat-weights", "0,0.5", "--plain-modes", "class,empty", "--steps", "2,4"])
    arms = experiment.arms_of(args)
    assert Arm.make(0.0, "empty", 2, 3) == Arm(0.0, "class", 2, 1)  # LoRA has one form
    assert [a.label() for a in arms] == [
        "LoRA (2 steps)",
        "CAT 0.5 (2 steps)",
        "CAT 0.5, plain empty (2 steps)",
        "LoRA (4 steps)",
        "CAT 0.5 (4 steps)",
        "CAT 0.5, plain empty (4 steps)",
    ]
    assert [a.label() for a in experiment.arms_of(experiment.parse_args(["--cat-weights", "1"]))] == [
        "LoRA (400 steps)",
        "CAT 1 (400 steps)",
    ]


def test_an_interrupted_experiment_continues_with_the_runs_it_lacks(interrupted_then_resumed):
    tmp_path, first, logged, second, calls, partial = interrupted_then_resumed
    lora, every_step, every_2 = Arm(0.0, "class", 2, 1), Arm(0.5, "class", 2, 1), Arm(0.5, "class", 2, 2)
    assert first == 130 and [Arm.of(r) for r in logged] == [lora] and "logged_at" in logged[0]
    assert [Arm.of(r) for r in partial["runs"]] == [lora] and len(partial["missing_runs"]) == 2
    assert second == 0 and calls == [lora, every_step, every_step, every_2]  # the interrupted run again, once
    result = json.loads((tmp_path / "results.json").read_text())
    assert sorted(Arm.of(r).label() for r in result["runs"]) == sorted(
        a.label() for a in (lora, every_step, every_2)
    )
    assert len(result["commands"]) == 2 and "--cat-every 1,2" in result["command"]
    assert result["missing_runs"] == []


def test_the_record_pairs_each_arm_with_lora_and_its_reference(interrupted_then_resumed):
    tmp_path = interrupted_then_resumed[0]
    result = json.loads((tmp_path / "results.json").read_text())
    runs = {Arm.of(r): r for r in result["runs"]}
    entries = {e["label"]: e for e in result["summary"]}
    every_2 = entries["CAT 0.5, every 2 (2 steps)"]
    expected = runs[Arm(0.5, "class", 2, 2)]["kps"] - runs[Arm(0.0, "class", 2, 1)]["kps"]
    assert every_2["vs_lora"]["kps"]["mean"] == pytest.approx(expected, abs=1e-12)
    expected = runs[Arm(0.5, "class", 2, 2)]["kps"] - runs[Arm(0.5, "class", 2, 1)]["kps"]
    assert every_2["vs_reference"]["kps"]["mean"] == pytest.approx(expected, abs=1e-12)
    assert every_2["reference"] == "CAT 0.5 (2 steps)" and "vs_lora" not in entries["LoRA (2 steps)"]
    decision = result["decision"]
    assert decision["chosen_weight"] in (0.5, 1.0) and "cat_every_2" in decision["follow_ups"]
    assert "CAT 0.5, every 2 (2 steps) − LoRA" in result["table_markdown"]


def test_logged_runs_are_reused_only_for_identical_settings(interrupted_then_resumed, capsys):
    tmp_path = interrupted_then_resumed[0]
    capsys.readouterr()
    plot = tmp_path / "sweep.png"
    # One more weight: only its run trains; the logged ones are reused. Then a plot of the record.
    argv = _argv(tmp_path, "--threads", "1", "--plot", str(plot))
    argv[argv.index("--cat-weights") + 1] = "0.5,1"
    assert experiment.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 runs to do, 3 logged" in out and out.count("seed 0 CAT 1") == 2  # weight 1, k = 1 and 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    argv[argv.index("--eval-steps") + 1] = "3"  # another eval setting: nothing logged counts
    assert experiment.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 logged runs have another model or settings" in out and "5 runs to do, 0 logged" in out


def test_two_worker_processes_give_the_rows_of_one(interrupted_then_resumed, tmp_path):
    single = json.loads((interrupted_then_resumed[0] / "results.json").read_text())["runs"]
    argv = [
        *TINY,
        *ARMS,
        "--work",
        str(tmp_path / "work"),
        "--results",
        str(tmp_path / "r.json"),
        "--processes",
        "2",
    ]
    argv[argv.index("--cat-every") + 1] = "1"
    assert experiment.main(argv) == 0
    pooled = json.loads((tmp_path / "r.json").read_text())
    assert pooled["processes"] == 2 and pooled["threads_per_process"] == 1
    assert {r["torch_threads"] for r in pooled["runs"]} == {1}
    mine = {Arm.of(r): r["kps"] for r in single}
    assert {Arm.of(r): r["kps"] for r in pooled["runs"]} == {
        a: mine[a] for a in (Arm(0.0, "class", 2, 1), Arm(0.5, "class", 2, 1))
    }


def test_bad_lists_are_one_line(capsys):
    assert experiment.main(["--cat-every", "0"]) == 2
    assert "--cat-every must be >= 1" in capsys.readouterr().err
    assert experiment.main(["--concepts", "nope", "--dry-run"]) == 2
    assert "--concept nope: not a built-in concept" in capsys.readouterr().err
