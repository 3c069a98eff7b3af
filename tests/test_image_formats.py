"""TIFF, WebP and BMP images are collected and read like JPEG and PNG (Pillow decodes all of them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from extract import images
from extract.images import IMAGE_SUFFIXES, ImageError, load_image
from extract.manifest import read_manifest
from imagefiles import lesion


def _formats_folder(root: Path) -> dict[str, np.ndarray]:
    """A class-folder data set with one image of each newly read format; returns the RGB pixels that
    each must load as, by file path relative to `root`."""
    rgb = lesion(1, (16, 12))
    gray16 = (np.arange(16 * 12, dtype=np.uint16).reshape(12, 16) * 331 + 7).astype(np.uint16)
    written = {
        "mel/rgb.tif": rgb,
        "mel/gray16.tiff": gray16,
        "nv/lossless.webp": lesion(2, (16, 12)),
        "nv/plain.bmp": lesion(3, (16, 12)),
        "nv/upper.TIF": lesion(4, (16, 12)),  # suffix case does not matter
    }
    for rel, arr in written.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if arr.dtype == np.uint16:
            sixteen = Image.fromarray(arr)  # uint16: mode "I;16"
            assert sixteen.mode == "I;16"
            sixteen.save(path, format="TIFF")
        elif path.suffix.lower() == ".webp":
            Image.fromarray(arr).save(path, lossless=True, quality=100)
        else:
            Image.fromarray(arr).save(path)
    expected = {}
    for rel, arr in written.items():
        if arr.dtype == np.uint16:  # scaled by the range of the type, as for 16-bit PNGs
            gray = np.rint(arr.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
            arr = np.repeat(gray[..., None], 3, axis=2)
        expected[rel] = arr
    (root / "nv" / "notes.txt").write_text("not an image")
    return expected


def test_suffixes_keep_the_common_formats_first_for_bare_ids():
    assert IMAGE_SUFFIXES[:3] == (".jpg", ".jpeg", ".png")
    assert {".tif", ".tiff", ".webp", ".bmp"} <= set(IMAGE_SUFFIXES)
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow was built without WebP")
def test_class_folder_lists_tiff_webp_and_bmp_and_reads_their_pixels(tmp_path):
    expected = _formats_folder(tmp_path)
    manifest = read_manifest(tmp_path)
    assert sorted(manifest.path) == sorted(expected)  # every image listed; notes.txt is not an image
    labels = dict(zip(manifest.path, manifest.label))
    assert labels == {rel: rel.split("/")[0] for rel in expected}
    for row, rel in enumerate(manifest.path):
        img, _ = load_image(manifest.file(row))
        assert img.mode == "RGB" and img.size == (16, 12), rel
        np.testing.assert_array_equal(np.asarray(img), expected[rel], err_msg=rel)  # all lossless: exact


def test_bare_ids_in_a_csv_find_tiff_webp_and_bmp_files(tmp_path):
    folder = tmp_path / "images"
    for name in ("a.tif", "b.tiff", "c.webp", "d.bmp"):
        folder.mkdir(exist_ok=True)
        Image.fromarray(lesion(5, (16, 12))).save(folder / name, **({"lossless": True} if "webp" in name else {}))
    csv = tmp_path / "labels.csv"
    csv.write_text("image_id,label\na,mel\nb,nv\nc,mel\nd,nv\n")
    manifest = read_manifest(csv, images=folder)
    assert [manifest.file(row).name for row in range(len(manifest))] == ["a.tif", "b.tiff", "c.webp", "d.bmp"]


def test_webp_without_pillow_support_says_so(tmp_path, monkeypatch):
    """A Pillow built without libwebp does not recognise WebP files at all: the reason says why."""
    path = tmp_path / "x.webp"
    path.write_bytes(b"bytes that no Pillow plugin recognises")
    with pytest.raises(ImageError, match="unrecognised file format"):
        load_image(path)
    monkeypatch.setattr(images.features, "check", lambda name: False)
    with pytest.raises(ImageError, match="WebP"):
        load_image(path)
