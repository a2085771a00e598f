"""``cat-engine eval`` end to end on the built-in model with the tiny CLIP, and under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cat_engine.cat import eval as kps_eval
from cat_engine.cat.clip import ClipError
from cat_engine.cat.eval import EvalConfig, EvalError, evaluate
from cat_engine.cat.kps import METRICS
from cat_engine.cat.report import KpsReport, json_safe, write_report
from cat_engine.cli import main
from cat_engine.engine.lora import add_lora, save_lora
from cat_engine.engine.models import load_base

FAST = ["--seeds", "2", "--steps", "2", "--clip", "builtin-tiny-clip-random", "--no-progress"]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    """An adapter on the built-in model with non-zero B, saved with its token and class word."""
    model = load_base(load_encoders=False)
    add_lora(model.unet, rank=4, seed=1)
    g = torch.Generator().manual_seed(3)
    for name, p in model.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    out = tmp_path_factory.mktemp("lora")
    save_lora(model.unet, out, info={"token": "sks", "class_word": "star"})
    return out


@pytest.fixture(scope="module")
def base_dir(lora_dir):
    """The built-in model's folder as this process resolved it (the adapter was made on it)."""
    return load_base(load_encoders=False).path


@pytest.fixture(scope="module")
def refs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("refs")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        pixels = (torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(out / f"ref_{i}.png")
    (out / "notes.txt").write_text("not an image")
    return out


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, lora_dir):
    """One in-process run on the built-in defaults; the 2-rank test compares against it too."""
    out = tmp_path_factory.mktemp("single") / "eval"
    code = main(["eval", "--lora", str(lora_dir), "--output", str(out), *FAST])
    return code, out


def test_cli_end_to_end_on_the_builtin_default(single_run):
    code, out = single_run
    assert code == 0
    report = json.loads((out / "kps.json").read_text())
    for key in METRICS:
        assert isinstance(report[key], float), key
    assert report["definition"] == "kps-v1"
    assert report["embedding"] == {"id": "builtin-tiny-clip-random", "random_weights": True}
    # the built-in's name (the random tiny pipeline's carries a fingerprint), not a cache path
    assert report["model"]["id"] == "toyworld-v2" or report["model"]["id"].startswith("builtin-tiny-sd-v1")
    assert report["seeds"] == [0, 1]
    assert report["token"] == "sks" and report["class_word"] == "star"
    assert [p["template"] for p in report["prompts"]] == list(kps_eval.DEFAULT_TEMPLATES)
    assert report["prompts"][0] == {
        "template": "a photo of {}",
        "token_prompt": "a photo of sks star",
        "plain_prompt": "a photo of star",
    }
    assert len(report["per_prompt"]) == len(kps_eval.DEFAULT_TEMPLATES)
    assert set(METRICS) <= set(report["per_prompt"][0])
    assert report["kps"] == pytest.approx(
        2 * report["identity"] * report["preservation"] / (report["identity"] + report["preservation"])
    )
    assert report["throughput"]["images"] == 3 * 4 * 2 and report["images_per_second"] > 0
    assert report["references"]["count"] > 0  # the built-in concept set
    # grid: a label column plus 2 seed columns, 3 rows per prompt (4 prompts) of >=128 px cells
    grid = Image.open(out / "grid.png")
    assert grid.height >= 12 * 128 and grid.width >= 2 * 128
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "kps.json"]  # no temporary files left


def test_prompts_file_refs_and_flags(tmp_path, lora_dir, refs_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n{} in a forest\n\n")
    out = tmp_path / "eval"
    args = ["--prompts", str(prompts), "--refs", str(refs_dir), "--token", "zq", "--class-word", "dog"]
    assert main(["eval", "--lora", str(lora_dir), "--output", str(out), *args, *FAST, "--seeds", "1"]) == 0
    report = json.loads((out / "kps.json").read_text())
    assert report["prompts"] == [
        {
            "template": "{} in a forest",
            "token_prompt": "zq dog in a forest",
            "plain_prompt": "dog in a forest",
        }
    ]
    assert report["references"]["count"] == 3
    assert report["diversity_adapter"] is None  # one image per set: no pair, written as null


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "/nonexistent/lora"], "no adapter there"),
        (["--refs", "/nonexistent/refs"], "folder not found"),
        (["--prompts", "PROMPTS"], "exactly one '{}'"),
        (["--clip", "/nonexistent/clip"], "not a transformers CLIP folder"),
        (["--clip", "TEXT_ONLY"], "is not an image-text embedding model"),
    ],
)
def test_user_errors_are_one_line(tmp_path, lora_dir, capsys, extra, message):
    (tmp_path / "p.txt").write_text("a photo of a dog\n")
    if "TEXT_ONLY" in extra:  # a folder that loads (tokenizer, processor, model) but holds a text encoder
        from transformers import CLIPTextModel

        from cat_engine.engine.builtin import clip_tokenizer
        from cat_engine.engine.builtin_clip import tiny_clip_config, tiny_clip_image_processor

        folder = tmp_path / "text_only"
        CLIPTextModel(tiny_clip_config().text_config).save_pretrained(folder)
        clip_tokenizer().save_pretrained(folder)
        tiny_clip_image_processor().save_pretrained(folder)
    extra = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in extra]
    extra = [str(tmp_path / "text_only") if a == "TEXT_ONLY" else a for a in extra]
    argv = ["eval", "--lora", str(lora_dir), "--output", str(tmp_path / "o"), *FAST, *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_two_cpu_ranks_equal_one_process(tmp_path, lora_dir, base_dir, single_run):
    """torchrun with 2 gloo ranks (as a user launches it) gives the single-process numbers.

    ``--base`` names the folder the single run used, so the ranks cannot resolve the built-in
    default to a different cache folder.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "cat_engine", "eval", "--base", str(base_dir), "--lora", str(lora_dir)]
    cmd += ["--output", str(tmp_path / "two"), *FAST]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    errors = [line for line in done.stderr.splitlines() if "rror" in line]
    assert done.returncode == 0, "\n".join(errors[:10]) or done.stderr[-3000:]
    assert "KPS " in done.stdout and "images/s" in done.stdout  # printed once, by rank 0
    assert done.stdout.count("KPS ") == 1
    one = json.loads((single_run[1] / "kps.json").read_text())
    two = json.loads((tmp_path / "two" / "kps.json").read_text())
    assert two["throughput"]["ranks"] == 2 and one["throughput"]["ranks"] == 1
    assert two["throughput"]["images"] == one["throughput"]["images"]
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    for a, b in zip(one["per_prompt"], two["per_prompt"], strict=True):
        for key in METRICS:
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["template"], key)


def test_base_defaults_to_the_folder_the_adapter_was_trained_on(tmp_path):
    from cat_engine.cat.eval import base_from_metadata

    assert base_from_metadata("given", {"base": str(tmp_path)}) == "given"
    assert base_from_metadata(None, {"base": str(tmp_path)}) == str(tmp_path)
    assert base_from_metadata(None, {"base": str(tmp_path / "moved-away")}) == "builtin"
    assert base_from_metadata(None, {}) == "builtin"


def test_python_api_gives_the_numbers_the_command_writes(tmp_path, single_run, lora_dir):
    config = EvalConfig(lora=str(lora_dir), seeds=2, steps=2, clip="builtin-tiny-clip-random")
    report = evaluate(config, progress=False)
    assert isinstance(report, KpsReport)
    written = json.loads((single_run[1] / "kps.json").read_text())
    got = json_safe(report.to_dict())
    assert list(got) == list(written)  # the same keys, in the file's order
    for key in (*METRICS, "per_prompt", "seeds", "prompts", "token", "class_word", "embedding", "references"):
        assert got[key] == written[key], key
    assert report.kps == written["kps"] and report.sampling == written["sampling"]
    assert write_report(report, tmp_path / "again") == tmp_path / "again"
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["grid.png", "kps.json"]


def test_python_api_raises_library_errors(tmp_path, lora_dir):
    with pytest.raises(EvalError, match="no adapter there"):
        evaluate(EvalConfig(lora=str(tmp_path / "nowhere")), progress=False)
    with pytest.raises(EvalError, match="exactly one '{}'"):
        evaluate(EvalConfig(lora=str(lora_dir), templates=["no subject"]), progress=False)
    with pytest.raises(EvalError, match="at least 1"):
        evaluate(EvalConfig(lora=str(lora_dir), seeds=0), progress=False)
    with pytest.raises(ClipError, match="not a transformers CLIP folder"):
        evaluate(EvalConfig(lora=str(lora_dir), seeds=1, steps=1, clip=str(tmp_path)), progress=False)


def test_first_seed_gives_disjoint_seed_sets_that_add_up(lora_dir, single_run):
    """Seeds 0 and 1 scored apart average to seeds 0..1 scored together (identity and preservation
    are means over images), so a first seed shifts the set without changing what a seed draws."""
    written = json.loads((single_run[1] / "kps.json").read_text())
    parts = [
        evaluate(
            EvalConfig(lora=str(lora_dir), seeds=1, first_seed=s, steps=2, clip="builtin-tiny-clip-random"),
            progress=False,
        )
        for s in (0, 1)
    ]
    assert [p.seeds for p in parts] == [[0], [1]]
    # A stride gives prompt p the seeds shifted by p x stride: here prompt 0 seed 0, prompt 1 seed 1.
    strided = evaluate(
        EvalConfig(
            lora=str(lora_dir), seeds=1, prompt_seed_stride=1, steps=2, clip="builtin-tiny-clip-random"
        ),
        progress=False,
    )
    for p in (0, 1):
        for key in ("identity", "preservation"):
            assert strided.per_prompt[p][key] == pytest.approx(parts[p].per_prompt[p][key], abs=1e-5)
    assert strided.sampling["prompt_seed_stride"] == 1
    for key in ("identity", "preservation", "leakage"):
        assert (parts[0].to_dict()[key] + parts[1].to_dict()[key]) / 2 == pytest.approx(
            written[key], abs=1e-5
        )
    with pytest.raises(EvalError, match="--first-seed and --prompt-seed-stride must be >= 0"):
        evaluate(EvalConfig(lora=str(lora_dir), first_seed=-1), progress=False)
