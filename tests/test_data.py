"""trainer.data.photos on real files written to tmp_path: every broken case is a file Pillow really reads."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from trainer.data.photos import (
    MIN_SIDE,
    ImageDataError,
    ImageSet,
    check_images,
    collect_image_paths,
    load_rgb,
    prepare_image,
)

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _halves(width: int, height: int, left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def _pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _deny_reading(monkeypatch: pytest.MonkeyPatch, name: str, error: OSError | None = None) -> None:
    """Reading the file called `name` fails as a chmod 0 file does for a user (root reads it anyway)."""
    read_bytes = Path.read_bytes

    def guarded(path: Path) -> bytes:
        if path.name == name:
            raise error or PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", guarded)


# --- collect_image_paths ----------------------------------------------------------------


def test_collect_missing_path_names_field_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ImageDataError) as info:
        collect_image_paths([missing], field="class_data_dir")
    assert str(info.value) == f"`class_data_dir`: {missing} does not exist"
    assert info.value.problems[0].path == missing


def test_collect_folder_without_images(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("hi")
    (texts / ".hidden.png").write_bytes(b"")
    with pytest.raises(ImageDataError) as info:
        collect_image_paths([str(empty), texts, tmp_path / "gone"])
    lines = str(info.value).splitlines()
    assert lines == [
        f"`instance_data`: folder {empty} has no images (.jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff)",
        f"`instance_data`: folder {texts} has no images (.jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff)",
        f"`instance_data`: {tmp_path / 'gone'} does not exist",
    ]


def test_collect_blank_source_is_not_the_working_directory() -> None:
    with pytest.raises(ImageDataError, match="an empty path was given"):
        collect_image_paths(["  "])


def test_collect_mixed_folder_order_and_filters(tmp_path: Path) -> None:
    for name in ("b.png", "A.JPG", "c.jpeg", "d.WebP", "notes.txt", ".hidden.png", "._b.png", "x.jpg.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.png").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is no image
    found = collect_image_paths([tmp_path])
    assert [p.name for p in found] == ["A.JPG", "b.png", "c.jpeg", "d.WebP"]


def test_collect_explicit_files_any_suffix_and_no_duplicates(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    found = collect_image_paths([tmp_path / "notes.txt", tmp_path, tmp_path / "a.png"])
    assert [p.name for p in found] == ["notes.txt", "a.png"]
    with pytest.raises(ImageDataError, match=r"notes\.txt: is not an image"):
        check_images(found, resolution=64)


# --- check_images ---------------------------------------------------------------------


def test_check_reports_every_problem_in_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected: dict[str, str] = {}  # file name -> part of its reason

    (tmp_path / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty file (0 bytes)"
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    expected["text.jpg"] = "is not an image"
    _noise(160, 160).save(tmp_path / "full.jpg", quality=95)  # under the lowered pixel limit below
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "full.jpg").unlink()
    expected["truncated.jpg"] = "is truncated or corrupt (image file is truncated"
    _noise(40, 30).save(tmp_path / "tiny.png")
    expected["tiny.png"] = f"is 40x30 px; at least {MIN_SIDE} px on each side is needed"
    frames = [Image.new("RGB", (80, 80), color) for color in (RED, GREEN, BLUE)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    expected["animated.gif"] = "is animated (3 frames); use a still image"
    # A decompression bomb without a huge file: lower the limit for this test only. 300x300 is over
    # twice the limit (Pillow's error); 200x200 is over it only once (Pillow's warning).
    _noise(300, 300).save(tmp_path / "bomb.png")
    expected["bomb.png"] = "is too large (decompression-bomb limit)"
    _noise(200, 200).save(tmp_path / "bomb_warning.png")
    expected["bomb_warning.png"] = "is too large (decompression-bomb limit)"
    _noise(128, 128).save(tmp_path / "locked.png")
    expected["locked.png"] = "cannot be read (permission denied)"
    _noise(128, 128, seed=1).save(tmp_path / "good.png")
    _noise(100, 80, seed=2).save(tmp_path / "good_small.jpg")

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 30_000)
    _deny_reading(monkeypatch, "locked.png")
    with pytest.raises(ImageDataError) as info:
        check_images(collect_image_paths([tmp_path]), resolution=128)

    lines = str(info.value).splitlines()
    assert len(lines) == len(expected) == len(info.value.problems)
    assert {p.path.name for p in info.value.problems} == set(expected)
    for name, reason in expected.items():
        assert any(line.startswith(f"{name}: ") and reason in line for line in lines), (name, lines)
    assert "good" not in str(info.value)


def test_check_turns_bomb_warning_into_error_without_touching_the_global_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _noise(200, 200).save(tmp_path / "big.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 30_000)
    with pytest.raises(ImageDataError, match=r"big\.png: is too large \(decompression-bomb limit\)"):
        check_images([tmp_path / "big.png"], resolution=64)
    assert PIL.Image.MAX_IMAGE_PIXELS == 30_000


def test_check_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "locked.png"
    _noise(128, 128).save(path)
    _deny_reading(monkeypatch, "locked.png")
    with pytest.raises(ImageDataError, match=r"^locked\.png: cannot be read \(permission denied\)$"):
        check_images([path], resolution=64)


def test_check_names_other_read_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "flaky.png"
    _noise(128, 128).save(path)
    _deny_reading(monkeypatch, "flaky.png", OSError(5, "Input/output error"))
    with pytest.raises(ImageDataError, match=r"^flaky\.png: cannot be read \(Input/output error\)$"):
        check_images([path], resolution=64)


def test_check_same_name_in_two_folders_shows_full_paths(tmp_path: Path) -> None:
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "photo.jpg")
        paths[-1].write_bytes(b"")
    with pytest.raises(ImageDataError) as info:
        check_images(paths, resolution=64)
    assert str(info.value).splitlines() == [f"{p}: empty file (0 bytes)" for p in paths]


def test_check_warnings_for_small_and_duplicate_images(tmp_path: Path) -> None:
    _noise(100, 80).save(tmp_path / "small.png")
    _noise(600, 512, seed=1).save(tmp_path / "big.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "big.png").read_bytes())
    notes = check_images([tmp_path / "small.png", tmp_path / "big.png", tmp_path / "copy.png"], 512)
    assert notes == [
        "small.png is 100x80 px, smaller than the training resolution 512: it will be upscaled",
        "copy.png has the same content as big.png: it will weigh twice in training",
    ]
    assert check_images([tmp_path / "big.png"], 512) == []


# --- load_rgb -----------------------------------------------------------------------------


def test_load_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones write it
    _halves(100, 60, RED, BLUE).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = load_rgb(tmp_path / "phone.jpg")
    assert image.mode == "RGB" and image.size == (60, 100)
    # Turning clockwise brings the left (red) half to the top.
    assert _close(_pixel(image, (30, 10)), RED) and _close(_pixel(image, (30, 90)), BLUE)


@pytest.mark.parametrize(
    ("image", "suffix", "expected"),
    [
        (Image.new("RGBA", (64, 64), (255, 0, 0, 0)), ".png", WHITE),
        (Image.new("RGBA", (64, 64), (0, 0, 0, 255)), ".png", (0, 0, 0)),
        (Image.new("LA", (64, 64), (0, 0)), ".png", WHITE),
        (Image.new("L", (64, 64), 100), ".png", (100, 100, 100)),
        (Image.new("1", (64, 64), 1), ".png", WHITE),
        (Image.new("CMYK", (64, 64), (0, 255, 255, 0)), ".tif", RED),
        (Image.new("CMYK", (64, 64), (0, 0, 0, 0)), ".tif", WHITE),
    ],
    ids=["rgba-clear", "rgba-opaque", "la-clear", "gray", "bilevel", "cmyk-red", "cmyk-white"],
)
def test_load_converts_modes(
    tmp_path: Path, image: Image.Image, suffix: str, expected: tuple[int, ...]
) -> None:
    path = tmp_path / f"image{suffix}"
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert _pixel(loaded, (10, 10)) == expected


def test_load_palette_with_and_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    image.paste(0, (0, 0, 32, 64))
    image.save(tmp_path / "palette.png")
    image.save(tmp_path / "clear.png", transparency=0)
    plain = load_rgb(tmp_path / "palette.png")
    assert _pixel(plain, (10, 10)) == (0, 0, 0) and _pixel(plain, (50, 10)) == (10, 200, 30)
    clear = load_rgb(tmp_path / "clear.png")
    assert _pixel(clear, (10, 10)) == WHITE and _pixel(clear, (50, 10)) == (10, 200, 30)


def test_load_scales_16_bit_instead_of_clipping(tmp_path: Path) -> None:
    values = np.array([[65535, 32768, 256, 0]] * 64, dtype=np.uint16).repeat(16, axis=1)
    Image.fromarray(values).save(tmp_path / "deep.png")  # mode I;16
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "deep.tif")  # mode I
    with Image.open(tmp_path / "deep.png") as png, Image.open(tmp_path / "deep.tif") as tif:
        assert (png.mode, tif.mode) == ("I;16", "I")  # the two 16-bit paths Pillow opens files in
    for name in ("deep.png", "deep.tif"):
        image = load_rgb(tmp_path / name)
        assert image.mode == "RGB"
        assert [_pixel(image, (x, 0)) for x in (0, 16, 32, 48)] == [
            (255, 255, 255),
            (128, 128, 128),
            (1, 1, 1),
            (0, 0, 0),
        ]


@pytest.mark.parametrize("suffix", [".webp", ".jpg", ".bmp"])
def test_load_common_formats(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"image{suffix}"
    Image.new("RGB", (64, 48), (200, 100, 50)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert _close(_pixel(image, (32, 24)), (200, 100, 50))


def test_load_broken_file_raises_image_data_error(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("nope")
    with pytest.raises(ImageDataError, match=r"fake\.png: is not an image"):
        load_rgb(tmp_path / "fake.png")


# --- prepare_image --------------------------------------------------------------------


def test_prepare_shape_and_range() -> None:
    tensor = prepare_image(_noise(300, 200), 64, center_crop=True, flip=False)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    assert torch.all(prepare_image(Image.new("RGB", (80, 90), WHITE), 64, True, False) == 1.0)
    assert torch.all(prepare_image(Image.new("RGB", (40, 30), (0, 0, 0)), 64, True, False) == -1.0)


def test_prepare_flip_mirrors() -> None:
    image = _halves(128, 128, RED, BLUE)
    plain = prepare_image(image, 64, center_crop=True, flip=False)
    flipped = prepare_image(image, 64, center_crop=True, flip=True)
    assert plain[0, 32, 0] > 0.9 and plain[2, 32, 63] > 0.9  # red left, blue right
    assert flipped[2, 32, 0] > 0.9 and flipped[0, 32, 63] > 0.9
    assert torch.equal(flipped, plain.flip(-1))


def test_prepare_center_crop_keeps_center() -> None:
    image = Image.new("RGB", (300, 100), RED)
    image.paste(GREEN, (100, 0, 200, 100))
    tensor = prepare_image(image, 100, center_crop=True, flip=False)
    assert torch.all(tensor[1] == 1.0) and torch.all(tensor[0] == -1.0)


def test_prepare_random_crop_follows_its_seed() -> None:
    # Column x holds value x, so a crop's first value is its left offset.
    columns = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))

    def crop(seed: int) -> torch.Tensor:
        return prepare_image(image, 64, center_crop=False, flip=False, crop_rng=random.Random(seed))

    assert torch.equal(crop(1), crop(1))
    assert not torch.equal(crop(1), crop(2))
    offsets = {round((crop(seed)[0, 0, 0].item() + 1) * 127.5) for seed in range(20)}
    assert len(offsets) > 5 and all(0 <= x <= 256 - 64 for x in offsets)


def test_prepare_rejects_non_rgb() -> None:
    with pytest.raises(ValueError, match="expects an RGB image"):
        prepare_image(Image.new("L", (64, 64)), 64, center_crop=True, flip=False)


# --- ImageSet -----------------------------------------------------------------------------


def test_image_set_caches_and_evicts(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        _noise(80, 70, seed=i).save(path)
    images = ImageSet(paths, cache_size=2)
    assert len(images) == 3
    first = images.image(0)
    assert first.mode == "RGB" and images.image(0) is first
    images.image(1)
    images.image(2)  # evicts 0, the least recently used
    assert images.image(0) is not first
    assert np.array_equal(np.asarray(images.image(0)), np.asarray(first))


def test_image_set_short_side_gives_the_same_tensors(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    _noise(400, 300).save(path)
    small = ImageSet([path], short_side=64).image(0)
    assert small.size == (85, 64)
    direct = prepare_image(load_rgb(path), 64, center_crop=True, flip=False)
    assert torch.equal(prepare_image(small, 64, center_crop=True, flip=False), direct)
    assert ImageSet([path], short_side=512).image(0).size == (400, 300)  # never enlarged in the cache
