"""Tests for extract/images.py: every image becomes an upright 8-bit RGB picture, or a clear reason."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED_DATA
from imagefiles import (
    lesion,
    mixed_folder,
    save,
    save_exif_rotated,
    save_png16,
    save_truncated_jpeg,
)

from extract.images import (
    ALPHA_BACKGROUND,
    IMAGE_SUFFIXES,
    ImageError,
    file_sha256,
    load_image,
    to_rgb8,
)


def smooth(w: int = 96, h: int = 72) -> np.ndarray:
    """An (h, w, 3) picture without noise (JPEG keeps it within a few levels), not symmetric."""
    yy, xx = np.mgrid[0:h, 0:w]
    red = 30 + 200 * xx / (w - 1)
    green = 30 + 200 * yy / (h - 1)
    blue = 60 + 150 * np.exp(-(((xx - w / 3) / (w / 6)) ** 2 + ((yy - h / 4) / (h / 6)) ** 2))
    return np.dstack([red, green, blue]).round().astype(np.uint8)


def pixels(path: Path, **kwargs) -> np.ndarray:
    """Load through load_image, check the RGB contract, return the pixels as an int array."""
    img, _ = load_image(path, **kwargs)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    return arr.astype(int)


def reason(path: Path, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        load_image(path, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- plain 8-bit images and the hash


def test_rgb_png_is_returned_bit_exact_with_sha256_of_file_bytes(tmp_path):
    arr = lesion(1)
    path = save(tmp_path / "a.png", arr)
    img, sha = load_image(path)
    assert img.mode == "RGB"
    assert img.size == (arr.shape[1], arr.shape[0])
    np.testing.assert_array_equal(np.asarray(img), arr)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha == expected
    assert file_sha256(path) == expected
    assert len(sha) == 64 and int(sha, 16) >= 0  # lowercase hex digest, not bytes


def test_file_sha256_reads_files_larger_than_one_block(tmp_path):
    # file_sha256 reads in 1 MiB blocks: a file over 2 blocks must still hash as a whole
    data = np.random.default_rng(0).integers(0, 256, (1 << 21) + 12345, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_is_of_the_bytes_not_the_pixels(tmp_path):
    # same pixels, different files (PNG vs PNG with EXIF-rotation) -> same picture, different hashes
    arr = lesion(2)
    plain = save(tmp_path / "plain.png", arr)
    rotated = save_exif_rotated(tmp_path / "rotated.png", arr)
    img_a, sha_a = load_image(plain)
    img_b, sha_b = load_image(rotated)
    np.testing.assert_array_equal(np.asarray(img_a), np.asarray(img_b))
    assert sha_a != sha_b
    assert sha_b == hashlib.sha256(rotated.read_bytes()).hexdigest()


def test_jpeg_loads_close_to_its_source(tmp_path):
    arr = smooth()
    path = save(tmp_path / "a.jpg", arr, quality=95)
    got = pixels(path)
    assert got.shape == arr.shape
    assert np.abs(got - arr).mean() < 3


# ---------------------------------------------------------------- EXIF orientation


def test_exif_rotated_png_equals_its_upright_twin(tmp_path):
    upright = lesion(4, (96, 72))  # (h, w) = (72, 96)
    path = save_exif_rotated(tmp_path / "rot.png", upright)
    with Image.open(path) as stored:
        assert stored.size == (72, 96)  # the file really holds the turned picture (w, h swapped)
    img, _ = load_image(path)
    assert img.size == (96, 72)
    np.testing.assert_array_equal(np.asarray(img), upright)


def test_exif_orientation_6_jpeg_is_turned_clockwise(tmp_path):
    stored = smooth(96, 72)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    path = tmp_path / "rot6.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    got = pixels(path)
    assert got.shape == (96, 72, 3)
    clockwise = np.rot90(stored, k=-1).astype(int)
    counter = np.rot90(stored, k=1).astype(int)
    assert np.abs(got - clockwise).mean() < 3
    assert np.abs(got - counter).mean() > 30  # the other turn is far off: the check can tell


# ---------------------------------------------------------------- mode conversions


def test_rgba_alpha_is_composited_onto_white(tmp_path):
    assert ALPHA_BACKGROUND == (255, 255, 255)
    arr = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128], [200, 100, 50, 255]]], dtype=np.uint8)
    got = pixels(save(tmp_path / "rgba.png", arr))
    assert got[0, 0].tolist() == [255, 255, 255]  # fully transparent -> background
    assert got[0, 1].tolist() == [10, 20, 30]  # opaque keeps its colour
    assert got[0, 3].tolist() == [200, 100, 50]
    # half transparent black over white: 255 * (1 - 128/255) = 127
    assert got[0, 2].tolist() == [127, 127, 127]


def test_la_alpha_is_composited_onto_white(tmp_path):
    arr = np.array([[[10, 0], [10, 255], [100, 128]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(arr, "LA").save(path)
    with Image.open(path) as check:
        assert check.mode == "LA"
    got = pixels(path)
    assert got[0, 0].tolist() == [255, 255, 255]
    assert got[0, 1].tolist() == [10, 10, 10]
    assert got[0, 2].tolist() == [177, 177, 177]  # 100*128/255 + 255*127/255


def _palette_image() -> Image.Image:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * (256 * 3 - 9))
    img.putdata([0, 1, 2])
    return img


def test_palette_without_transparency_keeps_palette_colours(tmp_path):
    path = tmp_path / "p.png"
    _palette_image().save(path)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" not in check.info
    got = pixels(path)
    assert got[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 0]]


def test_palette_with_single_transparent_index_becomes_white(tmp_path):
    path = tmp_path / "pt.png"
    _palette_image().save(path, transparency=1)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 1
    got = pixels(path)
    assert got[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 0, 0]]


def test_palette_with_per_entry_alpha_is_composited(tmp_path):
    path = tmp_path / "ptrns.png"
    _palette_image().save(path, transparency=bytes([255, 0, 128]))
    with Image.open(path) as check:
        assert check.mode == "P"
    got = pixels(path)
    # red opaque, green fully transparent -> white, black half transparent -> 127
    assert got[0].tolist() == [[255, 0, 0], [255, 255, 255], [127, 127, 127]]


def test_gif_palette_transparency_becomes_white(tmp_path):
    path = tmp_path / "pt.gif"
    _palette_image().save(path, transparency=1)
    got = pixels(path)
    assert got[0, 0].tolist() == [255, 0, 0]
    assert got[0, 1].tolist() == [255, 255, 255]


def test_grayscale_l_gives_equal_channels(tmp_path):
    gray = lesion(6)[..., 0]
    path = save(tmp_path / "l.png", gray)
    with Image.open(path) as check:
        assert check.mode == "L"
    got = pixels(path)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], gray)


def test_bilevel_mode_1_gives_black_and_white(tmp_path):
    path = tmp_path / "one.png"
    Image.fromarray(np.array([[False, True, True, False]])).save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    got = pixels(path)
    assert got[0].tolist() == [[0, 0, 0], [255, 255, 255], [255, 255, 255], [0, 0, 0]]


def test_cmyk_tiff_exact_values(tmp_path):
    img = Image.new("CMYK", (4, 1))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255), (0, 0, 255, 0)])
    path = tmp_path / "c.tif"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    got = pixels(path)
    assert got[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0], [255, 255, 0]]


def test_cmyk_jpeg_is_close_to_the_rgb_source(tmp_path):
    arr = smooth()
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(arr).convert("CMYK").save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    got = pixels(path)
    assert got.shape == arr.shape
    assert np.abs(got - arr).mean() < 3  # not inverted, not channel-swapped
    assert np.abs(got - (255 - arr)).mean() > 50


def test_16bit_gray_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 65535, 32768, 257, 1000, 128, 25700]], dtype=np.uint16)
    path = save_png16(tmp_path / "g16.png", values)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a high-depth image
    got = pixels(path)
    assert (got[0, :, 0] == got[0, :, 1]).all() and (got[0, :, 0] == got[0, :, 2]).all()
    # v * 255 / 65535 rounded: 32768 -> 127.502 -> 128, 1000 -> 3.89 -> 4, 128 -> 0.498 -> 0
    assert got[0, :, 0].tolist() == [0, 255, 128, 1, 4, 0, 100]


def test_16bit_gray_png_of_an_8bit_picture_round_trips(tmp_path):
    gray = lesion(22)[..., 1]
    path = save_png16(tmp_path / "g16.png", gray.astype(np.uint16) * 257)
    got = pixels(path)
    np.testing.assert_array_equal(got[..., 0], gray)
    np.testing.assert_array_equal(got[..., 2], gray)


def test_16bit_rgb_png_scales_channels_not_clipped(tmp_path):
    arr = np.zeros((1, 2, 3), dtype=np.uint16)
    arr[0, 0] = (65535, 32768, 1000)
    arr[0, 1] = (257, 65280, 0)
    got = pixels(save_png16(tmp_path / "rgb16.png", arr))
    assert got[0, 0, 0] == 255
    assert got[0, 0, 1] == 128  # not clipped to 255
    assert abs(got[0, 0, 2] - 1000 * 255 / 65535) <= 1  # 3.89: 3 or 4, never 255
    # Pillow decodes 16-bit RGB by its high byte: within one level of v * 255 / 65535
    assert got[0, 1, 0] == 1
    assert got[0, 1, 1] in (254, 255)
    assert got[0, 1, 2] == 0


def test_16bit_rgb_png_of_an_8bit_picture_round_trips(tmp_path):
    arr = lesion(23)
    got = pixels(save_png16(tmp_path / "rgb16.png", arr.astype(np.uint16) * 257))
    np.testing.assert_array_equal(got, arr)


def test_16bit_rgba_png_is_scaled_and_composited(tmp_path):
    arr = np.zeros((1, 3, 4), dtype=np.uint16)
    arr[0, 0] = (65535, 32768, 1000, 65535)  # opaque
    arr[0, 1] = (0, 0, 0, 0)  # transparent -> white
    arr[0, 2] = (0, 0, 0, 32768)  # half transparent black
    got = pixels(save_png16(tmp_path / "rgba16.png", arr))
    assert got[0, 0, :2].tolist() == [255, 128]
    assert abs(got[0, 0, 2] - 4) <= 1
    assert got[0, 1].tolist() == [255, 255, 255]
    assert got[0, 2].tolist() == [127, 127, 127]


def test_16bit_tiff_big_endian_is_scaled(tmp_path):
    img = Image.frombytes("I;16B", (3, 1), np.array([0, 65535, 32768], ">u2").tobytes())
    path = tmp_path / "b16.tif"
    img.save(path)
    got = pixels(path)
    assert got[0, :, 0].tolist() == [0, 255, 128]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_to_rgb8_16bit_modes(mode):
    dtype = "<u2" if mode == "I;16" else ">u2"
    img = Image.frombytes(mode, (4, 1), np.array([0, 65535, 32768, 257], dtype).tobytes())
    out = to_rgb8(img)
    assert out.mode == "RGB"
    assert np.asarray(out)[0, :, 0].tolist() == [0, 255, 128, 1]
    assert np.asarray(out)[0, :, 1].tolist() == [0, 255, 128, 1]


def test_to_rgb8_mode_i_uses_16bit_range_and_stretches_wider_values():
    in_range = Image.fromarray(np.array([[0, 65535, 32768]], dtype=np.int32), "I")
    assert in_range.mode == "I"
    assert np.asarray(to_rgb8(in_range))[0, :, 0].tolist() == [0, 255, 128]
    # values beyond 16 bits are scaled by the maximum, never clipped to 255 everywhere
    wide = Image.fromarray(np.array([[0, 131070, 65535]], dtype=np.int32), "I")
    assert np.asarray(to_rgb8(wide))[0, :, 0].tolist() == [0, 255, 128]


def test_32bit_integer_tiff_loads_scaled(tmp_path):
    path = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 65535, 32768, 6554]], dtype=np.int32), "I").save(path)
    with Image.open(path) as check:
        assert check.mode == "I"
    got = pixels(path)
    assert got[0, :, 0].tolist() == [0, 255, 128, 26]


def test_float_mode_f_in_unit_range(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    img = Image.fromarray(values, "F")
    assert np.asarray(to_rgb8(img))[0].tolist() == [[0] * 3, [64] * 3, [128] * 3, [255] * 3]
    path = tmp_path / "f.tif"
    img.save(path)
    with Image.open(path) as check:
        assert check.mode == "F"
    got = pixels(path)
    assert got[0, :, 0].tolist() == [0, 64, 128, 255]


def test_float_mode_f_above_one_is_scaled_by_its_maximum():
    img = Image.fromarray(np.array([[0.0, 2.0, 4.0]], dtype=np.float32), "F")
    assert np.asarray(to_rgb8(img))[0, :, 0].tolist() == [0, 128, 255]


def test_to_rgb8_rgb_input_is_unchanged():
    arr = lesion(7, (8, 6))
    out = to_rgb8(Image.fromarray(arr))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), arr)


# ---------------------------------------------------------------- bad files and their reasons


def test_missing_file(tmp_path):
    assert reason(tmp_path / "nope.jpg") == "missing file"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    assert reason(path) == "empty file (0 bytes)"


def test_directory_is_not_an_image(tmp_path):
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    assert reason(folder) == "is a directory, not an image file"


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("this is not an image\n")
    assert reason(path).startswith("not an image")


def test_truncated_jpeg(tmp_path):
    path = save_truncated_jpeg(tmp_path / "t.jpg", lesion(30))
    text = reason(path)
    assert text.startswith("truncated or corrupt image: ")
    assert "truncated" in text[len("truncated or corrupt image: ") :]  # Pillow's own detail kept


def test_truncated_png(tmp_path):
    path = save(tmp_path / "t.png", lesion(31))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert reason(path).startswith("truncated or corrupt image: ")


def test_decompression_bomb_guard_uses_max_pixels(tmp_path):
    path = save(tmp_path / "big.png", lesion(8, (100, 100)))
    text = reason(path, max_pixels=5000)
    assert text.startswith("refused: ")
    assert "100x100 = 10000 pixels" in text
    assert "5000" in text
    assert "decompression bomb guard" in text
    # the limit itself is allowed (refused only when strictly over it)
    img, _ = load_image(path, max_pixels=10000)
    assert img.size == (100, 100)
    with pytest.raises(ImageError, match="decompression bomb guard"):
        load_image(path, max_pixels=9999)


@pytest.mark.parametrize("pillow_limit", [3000, 6000])  # over 2x the limit: error; over 1x: warning
def test_pillow_decompression_bomb_is_an_image_error(tmp_path, monkeypatch, pillow_limit):
    path = save(tmp_path / "big.png", lesion(9, (100, 80)))  # 8000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    assert reason(path, max_pixels=10**9).startswith("refused as a decompression bomb: ")


def test_errors_are_image_errors_with_nonempty_reasons_for_a_mixed_folder(tmp_path):
    kinds = mixed_folder(tmp_path)
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert {p.stem for p in files} == set(kinds)
    for path in files:
        if kinds[path.stem] == "good":
            img, sha = load_image(path)
            assert img.mode == "RGB" and sha == file_sha256(path), path.name
        else:
            assert reason(path), path.name
    # the rotated twin equals the plain PNG it was made from
    a, _ = load_image(tmp_path / "nv" / "good_nv_0.png")
    b, _ = load_image(tmp_path / "nv" / "rotated_twin.png")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the 16-bit PNG of lesion(22) * 257 loads back as lesion(22)
    np.testing.assert_array_equal(pixels(tmp_path / "nv" / "sixteen.png")[..., 0], lesion(22)[..., 0])


# ---------------------------------------------------------------- colour-key transparency (tRNS)


@pytest.mark.parametrize(
    "arr, key",
    [
        (np.array([[10, 20, 30]], dtype=np.uint8), 20),
        (np.array([[[10, 20, 30], [1, 2, 3], [9, 9, 9]]], dtype=np.uint8), (1, 2, 3)),
    ],
    ids=["L", "RGB"],
)
def test_colour_key_transparency_becomes_white(tmp_path, arr, key):
    path = save(tmp_path / "key.png", arr, transparency=key)
    with Image.open(path) as check:
        assert check.info.get("transparency") == key
    got = pixels(path)
    assert got[0, 1].tolist() == [255, 255, 255]
    assert got[0, 0].tolist() == ([10, 10, 10] if arr.ndim == 2 else [10, 20, 30])  # the rest stays


# ---------------------------------------------------------------- a real dermoscopy image


def test_real_ham10000_image_loads():
    folder = SHARED_DATA / "ham10000_mel_nv_150" / "images"
    if not folder.is_dir():
        pytest.skip(f"shared data not available at {folder}")
    path = folder / "ISIC_0024310.jpg"
    img, sha = load_image(path)
    assert img.mode == "RGB" and img.size == (150, 150)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert 20 < np.asarray(img).mean() < 235
