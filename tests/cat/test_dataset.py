"""Concept data loading: good folders, every kind of bad input, captions, the built-in set."""

from __future__ import annotations

import logging
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cat_engine.cat
from cat_engine.cat.dataset import (
    DEFAULT_CLASS_WORD,
    DEFAULT_TOKEN,
    DataError,
    builtin_concept_dir,
    load_concept_images,
)

REPO = Path(__file__).resolve().parents[2]
R = 16  # small resolution keeps every test fast


def rgb(path: Path, color=(255, 0, 0), size=(R, R)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def pixel(data, row: int = 0) -> torch.Tensor:
    """The RGB value at the centre of image ``row``, back in 0..255."""
    return (data.pixels[row, :, R // 2, R // 2] + 1) * 127.5


# --- folders that cannot be used -------------------------------------------------------------


def test_missing_folder_is_one_line_data_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        load_concept_images(missing, resolution=R)
    assert str(info.value) == f"--data {missing}: folder not found"
    assert isinstance(info.value, ValueError)


def test_file_instead_of_folder(tmp_path):
    path = rgb(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"is a file; give a folder of images"):
        load_concept_images(path, resolution=R)


def test_empty_folder_and_folder_of_captions_only(tmp_path):
    with pytest.raises(DataError, match=r"folder has no images; put jpg, jpeg, png, webp, bmp"):
        load_concept_images(tmp_path, resolution=R)
    (tmp_path / "a.txt").write_text("a photo of sks star")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(DataError, match=r"folder has no images") as info:
        load_concept_images(tmp_path, resolution=R)
    assert "\n" not in str(info.value)


def test_no_usable_image_names_folder_and_counts(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(DataError) as info:
        load_concept_images(tmp_path, resolution=R)
    message = str(info.value)
    assert message.startswith(f"--data {tmp_path}: no usable image (1 unreadable, 1 not images)")
    assert "\n" not in message


# --- files that are skipped -------------------------------------------------------------------


def test_corrupt_images_skipped_with_one_warning_each(tmp_path, caplog):
    rgb(tmp_path / "good.png")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    buf = tmp_path / "full.png"
    rgb(buf, size=(64, 64))
    (tmp_path / "truncated.png").write_bytes(buf.read_bytes()[:60])
    buf.unlink()
    (tmp_path / "random.webp").write_bytes(bytes(range(256)))
    with caplog.at_level(logging.WARNING, logger="cat_engine"):
        data = load_concept_images(tmp_path, resolution=R)
    assert len(data) == 1 and data.summary.used == ["good.png"]
    assert data.summary.corrupt == ["garbage.jpg", "random.webp", "truncated.png"]
    assert data.summary.skipped == 3
    lines = warnings_of(caplog)
    assert len(lines) == 3
    assert all("skipped, cannot read the image" in line and "\n" not in line for line in lines)
    assert str(tmp_path / "garbage.jpg") in lines[0]
    assert lines[1].count(str(tmp_path / "random.webp")) == 1  # named once, not again in the reason
    assert "(not a format Pillow can decode)" in lines[1]
    assert str(tmp_path / "truncated.png") in lines[2] and "(image file is truncated)" in lines[2]


def test_non_images_skipped_captions_and_hidden_files_silent(tmp_path, caplog):
    rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of sks star")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    (tmp_path / "table.csv").write_text("x,y\n1,2\n")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING, logger="cat_engine"):
        data = load_concept_images(tmp_path, resolution=R)
    assert data.summary.not_image == ["doc.pdf", "table.csv"]
    lines = warnings_of(caplog)
    assert len(lines) == 2
    assert "doc.pdf: skipped, not an image file (.pdf)" in lines[0]
    assert "table.csv: skipped, not an image file (.csv)" in lines[1]
    assert "2 skipped (0 unreadable, 2 not images)" in data.summary.line()


# --- modes, sizes, order ----------------------------------------------------------------------


def test_every_mode_becomes_rgb(tmp_path):
    Image.new("L", (R, R), 0).save(tmp_path / "a_grey.png")
    Image.new("LA", (R, R), (0, 0)).save(tmp_path / "b_grey_alpha.png")  # fully transparent black
    Image.new("RGBA", (R, R), (255, 0, 0, 128)).save(tmp_path / "c_rgba.png")  # half red on white
    Image.new("I;16", (R, R), 65535).save(tmp_path / "d_16bit_white.png")
    Image.new("I;16", (R, R), 32896).save(tmp_path / "e_16bit_mid.png")  # 128 * 257
    palette = Image.new("P", (R, R), 1)
    palette.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "f_palette_transparent.png", transparency=1)  # index 1 transparent
    palette.save(tmp_path / "g_palette.png")
    Image.new("RGB", (R, R), (10, 20, 30)).save(tmp_path / "h_plain.bmp")
    data = load_concept_images(tmp_path, resolution=R)
    assert data.pixels.shape == (8, 3, R, R) and data.pixels.dtype == torch.float32
    expected = [
        (0, 0, 0),
        (255, 255, 255),
        (255, 127, 127),
        (255, 255, 255),
        (128, 128, 128),
        (255, 255, 255),
        (0, 255, 0),
        (10, 20, 30),
    ]
    for row, colour in enumerate(expected):
        got = pixel(data, row)
        assert torch.allclose(got, torch.tensor(colour, dtype=torch.float32), atol=1.01), (
            data.files[row],
            got,
        )
    assert len(data.summary.converted) == 7  # all but the RGB bmp


def test_small_image_upscaled_with_warning(tmp_path, caplog):
    rgb(tmp_path / "tiny.png", size=(4, 6))
    with caplog.at_level(logging.WARNING, logger="cat_engine"):
        data = load_concept_images(tmp_path, resolution=R)
    assert data.pixels.shape == (1, 3, R, R)
    assert data.summary.upscaled == ["tiny.png"]
    (line,) = warnings_of(caplog)
    assert "tiny.png: 4x6 is smaller than 16 px; upscaled" in line


def test_resize_then_center_crop(tmp_path):
    # 4R x 2R, halved to 2R x R, then the centre R columns kept. Green covers the centre with a
    # margin of 4 resized pixels (wider than Lanczos' reach), red lies only outside the crop.
    array = np.zeros((2 * R, 4 * R, 3), dtype=np.uint8)
    array[:] = (255, 0, 0)
    array[:, R - 8 : 3 * R + 8] = (0, 255, 0)
    Image.fromarray(array).save(tmp_path / "wide.png")
    data = load_concept_images(tmp_path, resolution=R)
    values = (data.pixels[0] + 1) * 127.5
    assert values.shape == (3, R, R)
    assert torch.allclose(values[1], torch.full((R, R), 255.0), atol=3)
    assert values[0].max() < 10 and values[2].max() < 10
    assert data.summary.upscaled == []


def test_exif_rotation_is_applied(tmp_path):
    # Stored 4R x 2R, red left half, blue right half; EXIF orientation 6 displays it turned 90
    # degrees clockwise, so the red half ends up on top.
    array = np.zeros((2 * R, 4 * R, 3), dtype=np.uint8)
    array[:, : 2 * R] = (255, 0, 0)
    array[:, 2 * R :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "phone.png", exif=exif)
    values = (load_concept_images(tmp_path, resolution=R).pixels[0] + 1) * 127.5
    assert values[0, 1, R // 2] > 250 and values[2, 1, R // 2] < 5  # top: red
    assert values[2, R - 2, R // 2] > 250 and values[0, R - 2, R // 2] < 5  # bottom: blue


def test_values_in_range_and_sorted_order(tmp_path):
    for name in ("z.png", "a.jpg", "m.webp"):
        rgb(tmp_path / name, color=(255, 255, 255))
    data = load_concept_images(tmp_path, resolution=R)
    assert [p.name for p in data.files] == ["a.jpg", "m.webp", "z.png"]
    assert data.pixels.min() >= -1.0 and data.pixels.max() <= 1.0
    assert data.pixels.max() == 1.0  # white maps to exactly 1


def test_flip_appends_mirrored_copies(tmp_path):
    array = np.zeros((R, R, 3), dtype=np.uint8)
    array[:, : R // 4] = 255  # white stripe on the left
    Image.fromarray(array).save(tmp_path / "a.png")
    rgb(tmp_path / "b.png")
    plain = load_concept_images(tmp_path, resolution=R)
    data = load_concept_images(tmp_path, resolution=R, flip=True)
    assert len(data) == 4 and data.flipped == [False, False, True, True]
    assert torch.equal(data.pixels[:2], plain.pixels)
    assert torch.equal(data.pixels[2:], plain.pixels.flip(-1))
    assert data.pixels[2, 0, 0, -1] == 1.0 and data.pixels[2, 0, 0, 0] == -1.0
    assert data.captions == plain.captions * 2 and data.files == plain.files * 2


# --- captions ---------------------------------------------------------------------------------


def test_captions_from_txt_else_template(tmp_path):
    rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a sks dog\nin the snow \n")
    rgb(tmp_path / "b.png")
    rgb(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("   \n")  # empty: template, with a warning
    data = load_concept_images(tmp_path, "sks", "dog", "{token} {class_word}, oil painting", R)
    assert data.captions == ["a sks dog in the snow", "sks dog, oil painting", "sks dog, oil painting"]
    assert data.summary.caption_files == 1
    assert data.plain_captions("class") == ["a dog in the snow", "dog, oil painting", "dog, oil painting"]
    assert data.plain_captions("empty") == ["", "", ""]


def test_default_caption_template(tmp_path):
    rgb(tmp_path / "a.png")
    data = load_concept_images(tmp_path, resolution=R)
    assert data.captions == [f"a photo of {DEFAULT_TOKEN} {DEFAULT_CLASS_WORD}"]
    assert data.summary.without_token == []


def test_caption_without_token_warns(tmp_path, caplog):
    rgb(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo of a dog")
    rgb(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a photo of sksx dog")  # not the whole word
    rgb(tmp_path / "c.png")
    (tmp_path / "c.txt").write_text("a photo of sks dog")
    with caplog.at_level(logging.WARNING, logger="cat_engine"):
        data = load_concept_images(tmp_path, "sks", "dog", resolution=R)
    assert data.summary.without_token == ["a.png", "b.png"]
    lines = warnings_of(caplog)
    assert len(lines) == 2
    assert str(tmp_path / "a.txt") in lines[0] and "does not contain the token 'sks'" in lines[0]
    assert str(tmp_path / "b.txt") in lines[1]


def test_template_without_token_warns_once(tmp_path, caplog):
    for name in ("a.png", "b.png", "c.png"):
        rgb(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="cat_engine"):
        data = load_concept_images(tmp_path, caption_template="a photo of a {class_word}", resolution=R)
    assert len(data.summary.without_token) == 3
    (line,) = warnings_of(caplog)
    assert "caption template" in line and "does not contain the token 'sks'" in line


@pytest.mark.parametrize("template", ["a photo of {name}", "a photo of {token"])
def test_bad_caption_template_is_data_error(tmp_path, template):
    rgb(tmp_path / "a.png")
    with pytest.raises(DataError, match=r"^--caption-template ") as info:
        load_concept_images(tmp_path, caption_template=template, resolution=R)
    assert "\n" not in str(info.value)


# --- the built-in concept ---------------------------------------------------------------------


def test_builtin_concept_ships_six_captioned_pngs():
    folder = builtin_concept_dir()
    assert folder.is_dir()
    # inside the cat_engine.cat package, so package-data "assets/**/*" installs it
    assert folder.is_relative_to(Path(cat_engine.cat.__file__).parent / "assets")
    images = sorted(folder.glob("*.png"))
    assert len(images) == 6
    for path in images:
        assert path.stat().st_size < 8000
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    data = load_concept_images(folder, resolution=64)
    assert data.summary.caption_files == 6 and data.summary.skipped == 0 and data.summary.upscaled == []
    assert all(c.startswith("a photo of sks star on a ") for c in data.captions)
    assert len(set(data.captions)) == 6  # backgrounds differ


def test_builtin_concept_is_reproduced_by_its_script(tmp_path):
    script = runpy.run_path(str(REPO / "tools" / "make_builtin_concept.py"))
    made = script["make"](tmp_path)
    committed = sorted(builtin_concept_dir().glob("*.png"))
    assert [p.name for p in made] == [p.name for p in committed]
    for new, old in zip(made, committed):
        # pixels, not bytes: PNG compression may differ between Pillow versions
        assert np.array_equal(np.asarray(Image.open(new)), np.asarray(Image.open(old))), new.name
        assert new.with_suffix(".txt").read_text() == old.with_suffix(".txt").read_text()
