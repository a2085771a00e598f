"""The toy world: deterministic, captions that name what is drawn, held-out concepts, shipped models."""

import random

import numpy as np
import pytest

from cat_engine.cat import toyworld as tw


def test_world_is_deterministic_and_varied():
    a_img, a_cap, a_scene = tw.sample(3, seed=5)
    b_img, b_cap, b_scene = tw.sample(3, seed=5)
    assert a_cap == b_cap and a_scene == b_scene
    assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
    images, captions, scenes = tw.dataset(40, seed=1)
    assert images.shape == (40, tw.SIZE, tw.SIZE, 3) and images.dtype == np.uint8
    assert len({s.cls for s in scenes}) >= 6 and len({s.background for s in scenes}) >= 6
    assert len(set(captions)) > 30


@pytest.mark.parametrize("index", range(20))
def test_caption_names_the_class_and_only_true_attributes(index):
    _, caption, scene = tw.sample(index, seed=2)
    words = caption.split()
    assert scene.cls in words
    for colour in tw.COLOURS:
        if colour in words[: words.index(scene.cls)]:
            assert colour == scene.colour
    full = tw.caption(scene, random.Random(0), full=True)
    assert scene.colour in full and scene.cls in full


def test_world_never_draws_a_concept_pattern():
    inks = {tw.COLOURS[name] for name in tw.PATTERN_INKS}
    rng = random.Random(0)
    assert all(tw.sample_scene(rng).ink in inks for _ in range(500))
    for name in tw.CONCEPTS:
        scenes = tw.concept_scenes(name)
        assert len(scenes) == 5
        assert all(scene.ink not in inks for scene, _ in scenes)
        # Nor a body of the world's ink colours: a white star with red stripes is a red star with white ones.
        assert all(scene.colour not in tw.PATTERN_INKS for scene, _ in scenes)


def test_committed_concept_sets_match_the_generator(tmp_path):
    import importlib.util
    from pathlib import Path

    from PIL import Image

    root = Path(tw.__file__).parent
    spec = importlib.util.spec_from_file_location("mk", root.parent / "tools" / "make_toyworld_concepts.py")
    if spec is None or not Path(spec.origin).exists():
        pytest.skip("tools/ is not part of an installed package")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make(tmp_path)
    for name in tw.CONCEPTS:
        committed = sorted((root / "assets" / "concepts" / name).glob("*.png"))
        assert len(committed) == 5
        for path in committed:
            fresh = tmp_path / name / path.name
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(fresh))), path
            assert path.with_suffix(".txt").read_text() == fresh.with_suffix(".txt").read_text()


def test_builtin_defaults_are_the_shipped_toy_world():
    from cat_engine.engine.builtin import TOYWORLD_DIR, builtin_model_dir
    from cat_engine.engine.builtin_clip import TOYWORLD_CLIP_DIR, builtin_clip_dir
    from cat_engine.engine.models import load_base

    assert builtin_model_dir() == TOYWORLD_DIR and builtin_clip_dir() == TOYWORLD_CLIP_DIR
    assert builtin_model_dir(pretrained=False) != TOYWORLD_DIR
    model = load_base()
    assert model.native_resolution == tw.SIZE and model.unet.config.cross_attention_dim == 32
    weights = [p for d in (TOYWORLD_DIR, TOYWORLD_CLIP_DIR) for p in d.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in weights) < 40e6
