"""Decoders: how image files become the uint8 pictures a backbone takes (`extract --decode`).

`pil` decodes, orients, resizes and crops every image in the DataLoader workers with Pillow, by the
policy of extract/images.py. On a GPU that bounds extraction: the CPU cores decode fewer JPEGs per
second than the model embeds (docs/results.md). `torch` has the workers only read the files (and the
JPEG header: size, colour mode, EXIF orientation); the main process decodes whole batches of JPEGs with
`torchvision.io.decode_jpeg` on the model's device (nvJPEG on CUDA, libjpeg-turbo on a CPU) and orients,
resizes and crops them there as tensor operations, by the same recipe (`Preprocess.tensor_to_uint8`).
Every other file (PNG, TIFF, a CMYK or greyscale JPEG, one without its end marker) and every JPEG the
batch decoder rejects goes through the `pil` path, one image at a time, so a bad file is listed under
/failed with Pillow's reason and the rest of its batch is embedded.

Both give the same pictures up to the resize's rounding (torch's antialiased resize is not Pillow's to
the last bit), so the decoder is part of a store's fingerprint (`pil` stores keep the fingerprint they
had before the option existed) and `predict` decodes as the training store did.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from extract.dataset import EachPreprocess, ImageBatch, ImageDataset, collate_images
from extract.images import ImageError, decode_image, open_image, read_image_file
from extract.preprocess import Preprocess

__all__ = [
    "DECODERS",
    "Decoder",
    "Encoded",
    "EncodedBatch",
    "EncodedDataset",
    "PilDecoder",
    "TorchDecoder",
    "auto_decode",
    "batch_decodable",
    "decode_jpegs",
    "orient",
]


class Decoder(Protocol):
    """What `extract` needs of a decoder: a dataset and collate function for the DataLoader's workers,
    and `finish`, run in the main process on each batch, which gives the pictures on the device."""

    name: str
    pin_memory: bool
    fallbacks: int
    """Images the `pil` path decoded although this decoder was asked for (reported at the end)."""

    def dataset(self) -> Dataset: ...

    def collate(self, items: list) -> object: ...

    def finish(self, batch: object, device: torch.device) -> ImageBatch: ...


class PilDecoder:
    """Pillow in the workers: the batch arrives decoded and cropped; the model's device gets it."""

    name = "pil"
    pin_memory = True
    fallbacks = 0

    def __init__(self, files: Sequence[Path], preprocesses: Sequence[Preprocess]):
        self.files, self.preprocesses = list(files), list(preprocesses)

    def dataset(self) -> Dataset:
        return ImageDataset(self.files, EachPreprocess(self.preprocesses))

    def collate(self, items: list) -> ImageBatch:
        return collate_images(items)

    def finish(self, batch: ImageBatch, device: torch.device) -> ImageBatch:
        return batch


@dataclass(frozen=True)
class Encoded:
    """A JPEG file's bytes as the batch decoder takes them, and its EXIF orientation (1-8)."""

    data: torch.Tensor
    orientation: int


class EncodedBatch(NamedTuple):
    """A batch of EncodedDataset items: dataset positions of the readable files, their SHA-256, each one's
    payload (Encoded bytes, or the `pil` path's per-preprocess tensors), and position -> reason."""

    positions: list[int]
    sha256: list[str]
    payloads: list["Encoded | list[torch.Tensor]"]
    failed: dict[int, str]


def batch_decodable(img: Image.Image, data: bytes) -> bool:
    """Whether the batch decoder takes this file: a colour JPEG (3 components, what nvJPEG's batched
    decoder and libjpeg-turbo both decode to RGB) that ends with its end-of-image marker (a truncated file
    goes to Pillow, which refuses it with its reason, as the `pil` path does)."""
    return img.format == "JPEG" and img.mode == "RGB" and data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9")


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: the `pil` path ignores it too
        return 1
    return value if value in ORIENTATIONS else 1


class EncodedDataset(Dataset):
    """`files[i]` read, not decoded, where the batch decoder takes it; decoded by the `pil` path here (in
    the worker) where it does not. Never raises: item (i, SHA-256, payload or None, reason)."""

    def __init__(self, files: Sequence[Path], preprocesses: Sequence[Preprocess]):
        self.files = list(files)
        self.each = EachPreprocess(preprocesses)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, str, object, str]:
        try:
            data, sha256 = read_image_file(self.files[i])
            img = open_image(data)
            if batch_decodable(img, data):
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return i, sha256, Encoded(encoded, _orientation(img)), ""
            return i, sha256, self.each(decode_image(data, self.files[i])), ""
        except ImageError as exc:
            return i, "", None, str(exc)
        except Exception as exc:  # one odd file must never stop a long run
            return i, "", None, f"unexpected error: {type(exc).__name__}: {exc}"


def collate_encoded(items: list[tuple[int, str, object, str]]) -> EncodedBatch:
    good = [item for item in items if item[2] is not None]
    failed = {i: reason for i, _, payload, reason in items if payload is None}
    return EncodedBatch([i for i, *_ in good], [sha for _, sha, *_ in good], [p for _, _, p, _ in good], failed)


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes to (3, H, W) uint8 RGB on `device`, as one batch (nvJPEG decodes a list at once on
    CUDA); when the batch fails (the decoder gives no partial results), each file again on its own, and
    None for a file that fails alone."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which is not a dependency yet
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for data in files:
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


ORIENTATIONS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda x: x,
    2: lambda x: x.flip(-1),  # mirrored
    3: lambda x: x.flip(-1).flip(-2),  # upside down
    4: lambda x: x.flip(-2),  # mirrored upside down
    5: lambda x: x.transpose(-2, -1),  # Pillow's TRANSPOSE
    6: lambda x: torch.rot90(x, -1, dims=(-2, -1)),  # Pillow's ROTATE_270 (a quarter turn clockwise)
    7: lambda x: x.transpose(-2, -1).flip(-1).flip(-2),  # Pillow's TRANSVERSE
    8: lambda x: torch.rot90(x, 1, dims=(-2, -1)),  # Pillow's ROTATE_90
}
"""EXIF orientation -> the tensor operation that makes the picture upright, as `ImageOps.exif_transpose`."""


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded (3, H, W) picture made upright by its EXIF orientation."""
    return ORIENTATIONS[orientation](x)


class TorchDecoder:
    """Batches of JPEGs decoded, oriented, resized and cropped on the model's device."""

    name = "torch"
    pin_memory = False  # the workers send file bytes; the decoder copies them to the device itself

    def __init__(self, files: Sequence[Path], preprocesses: Sequence[Preprocess]):
        self.files, self.preprocesses = list(files), list(preprocesses)
        self.each = EachPreprocess(preprocesses)
        self.fallbacks = 0

    def dataset(self) -> Dataset:
        return EncodedDataset(self.files, self.preprocesses)

    def collate(self, items: list) -> EncodedBatch:
        return collate_encoded(items)

    def finish(self, batch: EncodedBatch, device: torch.device) -> ImageBatch:
        failed = dict(batch.failed)
        jpegs = [k for k, p in enumerate(batch.payloads) if isinstance(p, Encoded)]
        decoded = decode_jpegs([batch.payloads[k].data for k in jpegs], device) if jpegs else []
        pictures: dict[int, torch.Tensor] = {}  # item -> upright (3, H, W) on the device
        pixels: dict[int, list[torch.Tensor]] = {}  # item -> the `pil` path's tensors, one per preprocess
        for k, picture in zip(jpegs, decoded):
            if picture is not None:
                pictures[k] = orient(picture, batch.payloads[k].orientation)
                continue
            position = batch.positions[k]
            try:  # rejected by the batch decoder: Pillow decides, and gives the reason if it fails too
                data = batch.payloads[k].data.numpy().tobytes()
                pixels[k] = self.each(decode_image(data, self.files[position]))
            except ImageError as exc:
                failed[position] = str(exc)
            except Exception as exc:  # one odd file must never stop a long run
                failed[position] = f"unexpected error: {type(exc).__name__}: {exc}"
        pixels.update({k: p for k, p in enumerate(batch.payloads) if not isinstance(p, Encoded)})
        self.fallbacks += len(pixels)
        kept = sorted([*pictures, *pixels])
        if not kept:
            return ImageBatch([], [], None, failed)
        row = {k: r for r, k in enumerate(kept)}
        images = []
        for index, preprocess in enumerate(self.preprocesses):
            out = torch.empty((len(kept), 3, preprocess.crop, preprocess.crop), dtype=torch.uint8, device=device)
            for items in _by_shape(pictures).values():
                rows = torch.tensor([row[k] for k in items], device=device)
                out[rows] = preprocess.tensor_to_uint8(torch.stack([pictures[k] for k in items]))
            for k, tensors in pixels.items():
                out[row[k]] = tensors[index].to(device)
            images.append(out)
        return ImageBatch([batch.positions[k] for k in kept], [batch.sha256[k] for k in kept], images, failed)


def _by_shape(pictures: dict[int, torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """Items grouped by picture size, so that each size is resized as one batch (an archive's images
    mostly share a few sizes)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, picture in pictures.items():
        groups.setdefault(tuple(picture.shape), []).append(k)
    return groups


DECODERS: dict[str, type] = {"pil": PilDecoder, "torch": TorchDecoder}
"""`extract --decode` choices: name -> decoder class, built with (files, preprocesses)."""

AUTO_ON_CPU = "pil"
"""What `--decode auto` picks on a CPU: on this project's 2-core machine the model bounds extraction and
the `pil` path decodes in the workers at the lowest priority, in the cycles the model leaves, where the
`torch` path decodes in the model's own process (docs/results.md has both measured)."""


def auto_decode(device: str) -> str:
    """`--decode auto`: the batch decoder on CUDA devices (nvJPEG), AUTO_ON_CPU elsewhere."""
    return "torch" if device.startswith("cuda") else AUTO_ON_CPU
