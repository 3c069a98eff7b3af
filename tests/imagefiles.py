"""Writers of small synthetic image files, good and bad, for the tests."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def lesion(seed: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """An (h, w, 3) uint8 picture with structure (a dark blob on skin tone, noise), not symmetric."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h * rng.uniform(0.3, 0.6), w * rng.uniform(0.3, 0.6)
    blob = np.exp(-(((yy - cy) / (h / 4)) ** 2 + ((xx - cx) / (w / 5)) ** 2))
    skin = np.array([210, 160, 140]) - blob[..., None] * np.array([150, 110, 90])
    img = skin + rng.normal(0, 12, (h, w, 3)) + np.linspace(0, 30, w)[None, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def csv_data_set(root: Path, n: int, name: str = "labels.csv", start: int = 0) -> Path:
    """n synthetic JPEGs `img/imNNN.jpg` (NNN from `start`) under `root`, with a CSV manifest `name`
    (image_id, path, label alternating nv/mel, lesion_id of two images each, age (blank for im003),
    site); returns the manifest's path."""
    rows = []
    for k in range(start, start + n):
        save(root / "img" / f"im{k:03d}.jpg", lesion(k), quality=90)
        rows.append(
            {
                "image_id": f"im{k:03d}",
                "path": f"img/im{k:03d}.jpg",
                "label": "mel" if k % 2 else "nv",
                "lesion_id": f"L{k // 2}",
                "age": "" if k == 3 else str(30 + k),
                "site": "back",
            }
        )
    manifest = root / name
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def lesion_set(root: Path, n_groups: int = 12) -> Path:
    """A CSV manifest of two pictures per lesion, classes alternating by lesion, mel darker (learnable
    even with random weights): the small labelled set of the fit, finetune and hub tests."""
    rows = []
    for g in range(n_groups):
        label = ("mel", "nv")[g % 2]
        for k in range(2):
            image_id = f"g{g:02d}_{k}"
            picture = lesion(g * 10 + k)
            if label == "mel":
                picture = (picture * 0.5).astype(np.uint8)
            save(root / "img" / f"{image_id}.png", picture)
            rows.append(f"{image_id},img/{image_id}.png,{label},G{g}")
    (root / "labels.csv").write_text("image_id,path,label,lesion_id\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


def save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


def save_exif_rotated(path: Path, upright: np.ndarray) -> Path:
    """Store the picture turned 90 degrees clockwise plus EXIF orientation 8: viewers show it upright.

    PNG keeps the pixels exact, so the loaded image must equal `upright` bit for bit.
    """
    stored = np.rot90(upright, k=-1)  # 90 degrees clockwise
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8  # "rotate 90 CW to view" is 6; 8 undoes a clockwise turn
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(stored)).save(path, exif=exif)
    return path


def save_png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG (gray (h, w), RGB (h, w, 3) or RGBA (h, w, 4)) written by hand: Pillow cannot."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def save_truncated_jpeg(path: Path, arr: np.ndarray) -> Path:
    save(path, arr, format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def mixed_folder(root: Path) -> dict[str, str]:
    """A class-folder data set of good and bad files; returns image id -> 'good' or 'bad'."""
    kinds: dict[str, str] = {}
    for k in range(4):
        save(root / "mel" / f"good_mel_{k}.jpg", lesion(k), quality=92)
        save(root / "nv" / f"good_nv_{k}.png", lesion(10 + k))
        kinds[f"good_mel_{k}"] = kinds[f"good_nv_{k}"] = "good"
    save_exif_rotated(root / "nv" / "rotated_twin.png", lesion(10))  # twin of good_nv_0
    cmyk = Image.fromarray(lesion(20)).convert("CMYK")
    (root / "mel").mkdir(parents=True, exist_ok=True)
    cmyk.save(root / "mel" / "cmyk.jpg", quality=95)
    rgba = np.dstack([lesion(21), np.full(lesion(21).shape[:2], 200, np.uint8)])
    save(root / "mel" / "rgba.png", rgba)
    save_png16(root / "nv" / "sixteen.png", lesion(22).astype(np.uint16) * 257)
    kinds.update(rotated_twin="good", cmyk="good", rgba="good", sixteen="good")
    save_truncated_jpeg(root / "mel" / "truncated.jpg", lesion(30))
    (root / "nv" / "empty.jpg").write_bytes(b"")
    (root / "nv" / "text.jpg").write_text("this is not an image\n")
    kinds.update(truncated="bad", empty="bad", text="bad")
    return kinds
