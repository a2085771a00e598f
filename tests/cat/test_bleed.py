"""The cross-concept (bleed) check of ``cat-engine eval --concepts``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cat_engine.cat import bleed
from cat_engine.cli import main
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.lora import add_lora, save_lora
from cat_engine.engine.models import load_base


def random_base() -> str:
    from cat_engine.engine import builtin

    try:
        return str(builtin.builtin_model_dir(pretrained=False))
    except TypeError:  # a version without the pretrained toy world
        return str(builtin.builtin_model_dir())


def test_identity_matrix_rows_are_prompts_and_columns_are_references():
    # Concept 0 lives on axis 0, concept 1 on axis 1; token 0's images are concept 0, token 1's
    # images are half concept 1, half concept 0 (bleed from 0 into 1's token).
    refs = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])]
    tok = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])]
    m = bleed.identity_matrix(tok, refs)
    assert np.allclose(m, [[1.0, 0.0], [0.5, 0.5]])
    s = bleed.summarize(m)
    assert s == pytest.approx({"self": 0.75, "cross": 0.25, "margin": 0.5})
    text = bleed.format_matrix({"tokens": ["aa", "bb"], "identity": m, **s})
    assert "0.5000" in text.splitlines()[-2] and text.splitlines()[-2].startswith("bb")


def test_concepts_file_accepts_training_configs(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "concepts:\n  - {data: bug, token: zwx, class_word: bug}\n  - {refs: /abs/fish, token: qlp, class-word: fish}\n"
    )
    concepts = bleed.read_concepts(tmp_path / "c.yaml")
    assert str(concepts[0]["refs"]) == "bug" and str(concepts[1]["refs"]) == "/abs/fish"
    assert [c["class_word"] for c in concepts] == ["bug", "fish"]
    (tmp_path / "one.yaml").write_text("- {refs: a, token: zwx, class_word: bug}\n")
    with pytest.raises(CatEngineError, match="at least two"):
        bleed.read_concepts(tmp_path / "one.yaml")
    (tmp_path / "same.yaml").write_text(
        "- {refs: a, token: x, class_word: bug}\n- {refs: b, token: x, class_word: c}\n"
    )
    with pytest.raises(CatEngineError, match="its own token"):
        bleed.read_concepts(tmp_path / "same.yaml")


def _refs(folder, colour):
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), [c + 20 * i for c in colour], np.uint8)).save(
            folder / f"{i}.png"
        )
    return folder


def test_eval_concepts_writes_matrix_per_concept_kps_and_grids(tmp_path, capsys):
    base = random_base()
    model = load_base(base, load_encoders=False)
    add_lora(model.unet, rank=4, seed=1)
    g = torch.Generator().manual_seed(3)
    for name, p in model.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    save_lora(model.unet, tmp_path / "lora", info={"token": "zwx", "class_word": "bug"})
    _refs(tmp_path / "bug", (200, 30, 30))
    _refs(tmp_path / "fish", (30, 30, 200))
    (tmp_path / "concepts.yaml").write_text(
        f"- {{refs: {tmp_path / 'bug'}, token: zwx, class_word: bug}}\n"
        f"- {{refs: {tmp_path / 'fish'}, token: qlp, class_word: fish}}\n"
    )
    (tmp_path / "prompts.txt").write_text("a photo of {}\n")
    code = main(
        [
            "eval",
            "--base",
            base,
            "--lora",
            str(tmp_path / "lora"),
            "--concepts",
            str(tmp_path / "concepts.yaml"),
        ]
        + ["--prompts", str(tmp_path / "prompts.txt"), "--seeds", "2", "--steps", "2"]
        + ["--clip", "builtin-tiny-clip-random", "--no-progress", "--output", str(tmp_path / "out")]
    )
    assert code == 0
    report = json.loads((tmp_path / "out" / "kps.json").read_text())
    matrix = report["bleed"]["identity"]
    assert report["bleed"]["tokens"] == ["zwx", "qlp"]
    assert np.asarray(matrix).shape == (2, 2) and np.asarray(report["bleed"]["base"]).shape == (2, 2)
    # The diagonal is each concept's own identity, computed by the one-concept scorer.
    for j, concept in enumerate(report["per_concept"]):
        assert matrix[j][j] == pytest.approx(concept["identity"], abs=1e-9)
        assert {"kps", "preservation", "leakage", "per_prompt"} <= concept.keys()
    assert report["kps"] == pytest.approx(np.mean([c["kps"] for c in report["per_concept"]]))
    for name in ("grid.png", "bleed.png"):
        with Image.open(tmp_path / "out" / name) as im:
            assert im.size[0] > 100
    assert "identity: prompt token (row)" in capsys.readouterr().out
