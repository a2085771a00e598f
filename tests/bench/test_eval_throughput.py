"""The sampler throughput comparison: every way makes the same images, and the figures add up."""

import pytest

from cat_engine.bench.eval_throughput import measure


def test_every_way_makes_the_same_images_and_is_timed():
    r = measure(prompts=1, seeds=1, steps=1, repeats=1)
    assert r["images"] == 3 and r["threads"] == 1
    assert r["max_image_diff"] <= 1e-4  # measure raises above this; the figure is reported too
    rate = r["images_per_second"]
    assert set(rate) == {"engine", "per_prompt", "per_image"} and min(rate.values()) > 0
    assert r["ratio_per_image"] == pytest.approx(rate["engine"] / rate["per_image"])
