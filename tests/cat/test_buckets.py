"""Aspect-ratio buckets: the sizes, each image's bucket and crop, SDXL's time ids, the batch sampler,
repeat folders, epochs, and bit-exact resume with buckets on the random tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.buckets import (
    BatchSampler,
    Crop,
    bucket_sizes,
    choose_bucket,
    cover_scale,
    fit_to_bucket,
    sample_indices,
)
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.cat.data import draw_batch, load_training_images, prepare_data
from cat_engine.cat.dataset import load_concept_images
from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.models import load_base


def image(path, w, h, colour=(200, 40, 40)):
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(path)
    return path


@pytest.fixture
def shapes(tmp_path):
    """Two square, two wide (2:1) and one tall (1:2) image, each with its own colour."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, (w, h) in enumerate([(64, 64), (80, 80), (128, 64), (140, 70), (60, 120)]):
        image(folder / f"{i}.png", w, h, (40 * i, 255 - 40 * i, 90))
    return folder


# --- sizes, choice and fitting ----------------------------------------------------------------


def test_bucket_sizes_follow_kohyas_rule():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes and (256, 1024) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and 256 <= min(h, w) and max(h, w) <= 1024
    assert sizes == sorted(set(sizes))
    # the built-in model's 64 px and any resolution up to the step: one square bucket, as --no-buckets
    assert bucket_sizes(64) == [(64, 64)] and bucket_sizes(16) == [(16, 16)]
    assert (48, 80) in bucket_sizes(64, step=16)


def test_each_image_goes_to_the_bucket_of_closest_aspect_ratio():
    sizes = bucket_sizes(512)
    assert choose_bucket(1000, 1000, sizes) == (512, 512)
    # 3:2 lies between 576x448 (1.29) and 640x384 (1.67); the second is closer in log ratio
    assert choose_bucket(3000, 2000, sizes) == (384, 640)
    assert choose_bucket(2000, 3000, sizes) == (640, 384)
    for w, h in [(1000, 237), (640, 480), (333, 999), (517, 512)]:
        best = min(abs(math.log(b[1] / b[0]) - math.log(w / h)) for b in sizes)
        assert (
            abs(math.log(choose_bucket(w, h, sizes)[1] / choose_bucket(w, h, sizes)[0]) - math.log(w / h))
            == best
        )


@pytest.mark.parametrize(
    "size", [(64, 64), (130, 40), (40, 130), (1000, 237), (33, 97), (512, 512), (700, 300)]
)
def test_no_image_is_scaled_more_than_its_bucket_needs(size):
    buckets = bucket_sizes(64, step=16) + bucket_sizes(512)
    for bucket in buckets:
        fitted, crop, resized = fit_to_bucket(Image.new("RGB", size), bucket)
        bh, bw = bucket
        assert fitted.size == (bw, bh) and crop.target == bucket and crop.original == (size[1], size[0])
        # the resized image covers the bucket, and is cut along one side at most: the least scale
        assert resized[0] >= bw and resized[1] >= bh and (resized[0] == bw or resized[1] == bh)
        scale = cover_scale(*size, bucket)
        assert abs(resized[0] - size[0] * scale) <= 0.5 + 1e-9 or resized[0] == bw
        assert abs(resized[1] - size[1] * scale) <= 0.5 + 1e-9 or resized[1] == bh
        top, left = crop.top_left
        assert (top, left) == ((resized[1] - bh) // 2, (resized[0] - bw) // 2)


def test_the_square_bucket_is_the_centre_crop(tmp_path):
    image(tmp_path / "wide.png", 40, 16)
    plain = load_concept_images(tmp_path, resolution=16)
    bucketed = load_concept_images(tmp_path, resolution=16, buckets=[(16, 16)])
    assert torch.equal(plain.pixels, bucketed.pixels)
    assert plain.crops == [Crop((16, 40), (0, 12), (16, 16))]


def test_flipped_copies_mirror_their_crop(tmp_path):
    image(tmp_path / "wide.png", 41, 16)  # resized 41 wide: the centre crop starts at 12, mirrored at 13
    data = load_concept_images(tmp_path, resolution=16, flip=True, buckets=[(16, 16)])
    assert [c.top_left for c in data.crops] == [(0, 12), (0, 13)]


def test_small_images_in_a_bucket_are_upscaled_with_a_warning(tmp_path, caplog):
    image(tmp_path / "small.png", 40, 20)
    with caplog.at_level("WARNING", logger="cat_engine"):
        data = load_concept_images(tmp_path, resolution=64, buckets=bucket_sizes(64, step=16))
    assert data.images[0].shape == (3, 48, 80) and data.summary.upscaled == ["small.png"]
    assert "small.png: 40x20 is smaller than its 80x48 bucket; upscaled" in caplog.text


# --- SDXL micro-conditioning -------------------------------------------------------------------


def test_sdxl_time_ids_carry_the_real_original_size_and_crop(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    image(folder / "a.png", 130, 40)  # ratio 3.25: bucket 112x32 (3.5) is log-closer than 96x32 (3)
    image(folder / "b.png", 64, 64)
    config = TrainConfig(data=str(folder), bucket_step=16, batch_size=1).validate()
    model = load_base(builtin_model_dir("sdxl", pretrained=False))
    data = prepare_data(config, model, 64, "cpu")
    # 130x40 scaled by max(112/130, 32/40) = 0.8615 to 112x34, cut 1 row from the top: hand-computed
    assert data.time_ids.tolist() == [[40, 130, 1, 0, 32, 112], [64, 64, 0, 0, 64, 64]]
    for row, shape in [(0, (1, 4, 8, 28)), (1, (1, 4, 16, 16))]:
        batch = draw_batch(data, [row], torch.Generator().manual_seed(0), model.noise_scheduler)
        assert batch.noisy_latents.shape == shape
        assert torch.equal(batch.added_cond_kwargs["time_ids"], data.time_ids[row : row + 1])
        assert torch.equal(batch.plain_added_cond_kwargs["time_ids"], data.time_ids[row : row + 1])


# --- the sampler ---------------------------------------------------------------------------------


def test_one_bucket_samples_the_stream_of_sample_indices():
    sampler = BatchSampler([list(range(7))], batch_size=3, seed=5)
    assert sampler.steps_per_epoch == 3
    for step in range(10):
        assert sampler.indices(step) == sample_indices(step, 3, 7, 5)


def test_batches_come_from_one_bucket_and_every_row_is_seen_evenly():
    groups = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 10, 10]]  # row 10 repeated 3 times
    sampler = BatchSampler(groups, batch_size=2, seed=1)
    assert sampler.steps_per_epoch == 3 + 1 + 3
    steps = [sampler.indices(s) for s in range(sampler.steps_per_epoch * 30)]
    owner = {row: g for g, rows in enumerate(groups) for row in rows}
    assert all(len({owner[r] for r in batch}) == 1 for batch in steps)
    # each epoch takes ceil(n / batch) batches from each bucket, in a shuffled order
    for epoch in range(3):
        part = steps[epoch * 7 : (epoch + 1) * 7]
        assert sorted(owner[b[0]] for b in part) == [0, 0, 0, 1, 2, 2, 2]
    seen = [r for b in steps for r in b]
    counts = {r: seen.count(r) for r in range(11)}
    for g, rows in enumerate(groups):
        per_item = [counts[r] / rows.count(r) for r in set(rows)]
        assert max(per_item) - min(per_item) <= 1, (g, per_item)  # a stream: epochs differ by one at most
    assert counts[10] / counts[9] == pytest.approx(3, rel=0.1)  # repeats weigh as listed
    # a pure function of the step: a fresh sampler, any order
    again = BatchSampler(groups, batch_size=2, seed=1)
    assert [again.indices(s) for s in reversed(range(len(steps)))] == steps[::-1]
    other = BatchSampler(groups, batch_size=2, seed=2)
    assert [other.indices(s) for s in range(7)] != steps[:7]


# --- training ----------------------------------------------------------------------------------


def _train(tmp_path, name, shapes, **overrides):
    options = dict(
        base=str(builtin_model_dir(pretrained=False)),
        data=str(shapes),
        bucket_step=16,
        rank=4,
        steps=6,
        batch_size=2,
        lr=1e-3,
        save_every=0,
        output=str(tmp_path / name),
    )
    values = {k: v for k, v in {**options, **overrides}.items() if v is not None}
    config = TrainConfig(**values).validate()
    return load_file(str(train_mod.train(config, progress=False)))


# --- repeats and epochs --------------------------------------------------------------------------


def test_repeat_folders_count_their_images_n_times(tmp_path, caplog):
    (tmp_path / "3_sks star").mkdir()
    (tmp_path / "other").mkdir()
    image(tmp_path / "top.png", 16, 16)
    image(tmp_path / "3_sks star" / "a.png", 16, 16)
    (tmp_path / "3_sks star" / "a.txt").write_text("sks star on the beach")
    with caplog.at_level("WARNING", logger="cat_engine"):
        data = load_concept_images(tmp_path, resolution=16)
    assert data.repeats == [3, 1] and data.captions == ["sks star on the beach", "a photo of sks star"]
    assert data.summary.used == ["3_sks star/a.png", "top.png"]
    assert "other: subfolder ignored" in caplog.text and "N_name" in caplog.text
    config = TrainConfig(data=str(tmp_path), flip=True).validate()
    images = load_training_images(config, 16)
    assert images.repeats == [3, 1, 3, 1]


def test_epochs_set_the_steps_and_show_in_the_log(tmp_path, shapes):
    _train(tmp_path, "out", shapes, epochs=2, steps=None)
    log = [json.loads(line) for line in (tmp_path / "out" / train_mod.LOG_FILE).read_text().splitlines()]
    # buckets 64x64 (2 images: 1 batch), 80x48 (2: 1 batch), 48x80 (1: 1 batch): 3 steps an epoch
    assert [r["epoch"] for r in log] == [1, 1, 1, 2, 2, 2]


def test_steps_and_epochs_together_are_refused():
    from cat_engine.cat.config import build_config

    with pytest.raises(ConfigError, match="--steps or --epochs, not both"):
        build_config({"steps": 10}, {"epochs": 2})


def test_resolution_must_divide_by_the_bucket_step(tmp_path, shapes):
    config = TrainConfig(data=str(shapes), bucket_step=64).validate()
    with pytest.raises(ConfigError, match="--resolution 96 must be a multiple of --bucket-step 64"):
        load_training_images(config, 96)


def _spy_latent_shapes(monkeypatch) -> list:
    """The latent size of every batch the loop draws, from now on."""
    shapes_seen, real = [], train_mod.draw_batch

    def spy(*args, **kwargs):
        batch = real(*args, **kwargs)
        shapes_seen.append(tuple(batch.noisy_latents.shape[2:]))
        return batch

    monkeypatch.setattr(train_mod, "draw_batch", spy)
    return shapes_seen


def test_resume_mid_epoch_is_bit_exact_with_buckets(tmp_path, shapes, monkeypatch):
    seen = _spy_latent_shapes(monkeypatch)
    straight = _train(tmp_path, "straight", shapes)
    assert len(set(seen)) == 3  # every bucket trained: square, wide and tall latents
    _train(tmp_path, "split", shapes, steps=4)  # 3 steps an epoch: stops inside the second
    resumed = _train(tmp_path, "split", shapes, resume="latest")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_no_buckets_trains_the_centre_square(tmp_path, shapes, monkeypatch):
    seen = _spy_latent_shapes(monkeypatch)
    _train(tmp_path, "square", shapes, buckets=False, steps=3)
    assert set(seen) == {(16, 16)}
