"""Decoders: how image files become the uint8 pictures a backbone takes (`extract --decode`).

`pil` decodes, orients, resizes and crops every image in the DataLoader workers with Pillow, by the
policy of extract/images.py. On a GPU that bounds extraction: the CPU cores decode fewer JPEGs per
second than the model embeds (docs/results.md). `torch` decodes JPEGs with `torchvision.io.decode_jpeg`
and orients, resizes and crops them as tensor operations, by the same recipe
(`Preprocess.tensor_to_uint8`). On a GPU the workers only read the files (and the JPEG header: size,
colour mode, EXIF orientation) and the main process decodes whole batches on the device (nvJPEG); on a
CPU the workers decode (libjpeg-turbo), in parallel with the model as the `pil` workers do. Every other
file (PNG, TIFF, a CMYK or greyscale JPEG, one without its end marker) and every JPEG the decoder
rejects goes through Pillow, one image at a time, so a bad file is listed under /failed with Pillow's
reason and the rest of its batch is embedded.

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
from extract.images import decode_image, failure_reason, open_image, read_image_file
from extract.preprocess import Preprocess

__all__ = [
    "AUTO_DECODE",
    "DECODERS",
    "Decoded",
    "Decoder",
    "Encoded",
    "EncodedBatch",
    "EncodedDataset",
    "PilDecoder",
    "TorchDecoder",
    "batch_decodable",
    "collate_encoded",
    "decode_jpegs",
    "orient",
    "resize_all",
]


class Decoder(Protocol):
    """What `extract` needs of a decoder: a dataset and collate function for the DataLoader's workers,
    and `finish`, run in the main process on each batch, which gives the pictures on the device."""

    pin_memory: bool
    fallbacks: int
    """Images the `pil` path decoded although this decoder was asked for (reported at the end)."""

    def dataset(self) -> Dataset: ...

    def collate(self, items: list) -> object: ...

    def finish(self, batch: object, device: torch.device) -> ImageBatch: ...


class PilDecoder:
    """Pillow in the workers: the batch arrives decoded and cropped; the model's device gets it."""

    pin_memory = True
    fallbacks = 0

    def __init__(self, files: Sequence[Path], preprocesses: Sequence[Preprocess], device: torch.device):
        self.files, self.preprocesses = list(files), list(preprocesses)

    def dataset(self) -> Dataset:
        return ImageDataset(self.files, EachPreprocess(self.preprocesses))

    def collate(self, items: list) -> ImageBatch:
        return collate_images(items)

    def finish(self, batch: ImageBatch, device: torch.device) -> ImageBatch:
        return batch


@dataclass(frozen=True)
class Encoded:
    """A JPEG file's bytes and its EXIF orientation (1-8), for the main process to decode. Bytes, not a
    tensor, between processes: a worker's tensor travels through shared memory, one file descriptor
    each, and receiving one per image is far slower than pickled bytes (docs/results.md, measured by
    bench/decode.py)."""

    data: bytes
    orientation: int


@dataclass(frozen=True)
class Decoded:
    """A picture decoded in the worker: one (3, crop, crop) uint8 tensor per preprocessing, and whether
    Pillow decoded it (a file the batch decoder does not take) rather than torchvision."""

    tensors: list[torch.Tensor]
    pillow: bool


class EncodedBatch(NamedTuple):
    """A batch of EncodedDataset items, collated in the worker: dataset positions of the readable files
    and their SHA-256 (one per item), the items to decode in the main process (item -> Encoded), the
    pictures of the items decoded in the worker stacked per preprocessing (items `decoded_items`, in
    that order; one tensor each, so they cross between processes as a few blocks), how many of those
    Pillow decoded, and position -> reason for the files that could not be used."""

    positions: list[int]
    sha256: list[str]
    encoded: dict[int, Encoded]
    decoded: list[torch.Tensor] | None
    decoded_items: list[int]
    pillow: int
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
    """`files[i]` for the torch decoder. A JPEG the batch decoder takes is only read (`Encoded`), or with
    `decode_here` decoded here by torchvision, in the worker, by the same operations the main process
    would run (what a CPU device does: there the workers are the cores that decode in parallel with the
    model). Any other file is decoded here by Pillow. Never raises: item (i, SHA-256, payload or None,
    reason)."""

    def __init__(self, files: Sequence[Path], preprocesses: Sequence[Preprocess], decode_here: bool):
        self.files, self.preprocesses, self.decode_here = list(files), list(preprocesses), decode_here
        self.each = EachPreprocess(preprocesses)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, str, object, str]:
        try:
            data, sha256 = read_image_file(self.files[i])
            img = open_image(data)
            if batch_decodable(img, data):
                if not self.decode_here:
                    return i, sha256, Encoded(data, _orientation(img)), ""
                [picture] = decode_jpegs([data], torch.device("cpu"))
                if picture is not None:
                    upright = [orient(picture, _orientation(img))]
                    return i, sha256, Decoded([resize_all(p, upright)[0] for p in self.preprocesses], False), ""
            return i, sha256, Decoded(self.each(decode_image(data, self.files[i])), True), ""
        except Exception as exc:  # one odd file must never stop a long run
            return i, "", None, failure_reason(exc)


def collate_encoded(items: list[tuple[int, str, object, str]]) -> EncodedBatch:
    good = [item for item in items if item[2] is not None]
    failed = {i: reason for i, _, payload, reason in items if payload is None}
    payloads = [payload for _, _, payload, _ in good]
    encoded = {k: p for k, p in enumerate(payloads) if isinstance(p, Encoded)}
    done = [k for k, p in enumerate(payloads) if isinstance(p, Decoded)]
    decoded = None
    if done:
        decoded = [torch.stack([payloads[k].tensors[j] for k in done]) for j in range(len(payloads[done[0]].tensors))]
    pillow = sum(payloads[k].pillow for k in done)
    return EncodedBatch([i for i, *_ in good], [sha for _, sha, *_ in good], encoded, decoded, done, pillow, failed)


def decode_jpegs(encoded: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG files' bytes to (3, H, W) uint8 RGB on `device`, as one batch (nvJPEG decodes a list at once
    on CUDA); when the batch fails (the decoder gives no partial results), each file again on its own,
    and None for a file that fails alone."""
    files = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
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
    """JPEGs decoded by torchvision, oriented, resized and cropped by tensor operations: in batches on the
    model's device when it is a GPU, in the loader workers when it is the CPU."""

    pin_memory = False  # the workers send file bytes; the decoder copies them to the device itself

    def __init__(
        self,
        files: Sequence[Path],
        preprocesses: Sequence[Preprocess],
        device: torch.device,
        *,
        in_workers: bool | None = None,
    ):
        self.files, self.preprocesses = list(files), list(preprocesses)
        self.in_workers = device.type == "cpu" if in_workers is None else in_workers
        """Decode in the loader workers (a CPU device) or in batches in the main process (a GPU; tests
        run that path on the CPU too)."""
        self.each = EachPreprocess(preprocesses)
        self.fallbacks = 0

    def dataset(self) -> Dataset:
        return EncodedDataset(self.files, self.preprocesses, decode_here=self.in_workers)

    def collate(self, items: list) -> EncodedBatch:
        return collate_encoded(items)

    def finish(self, batch: EncodedBatch, device: torch.device) -> ImageBatch:
        failed = dict(batch.failed)
        items = list(batch.encoded)
        decoded = decode_jpegs([batch.encoded[k].data for k in items], device) if items else []
        pictures: dict[int, torch.Tensor] = {}  # item -> upright (3, H, W) on the device
        rescued: dict[int, list[torch.Tensor]] = {}  # item -> Pillow's tensors, one per preprocess
        for k, picture in zip(items, decoded):
            if picture is not None:
                pictures[k] = orient(picture, batch.encoded[k].orientation)
                continue
            position = batch.positions[k]
            try:  # rejected by the batch decoder: Pillow decides, and gives the reason if it fails too
                rescued[k] = self.each(decode_image(batch.encoded[k].data, self.files[position]))
            except Exception as exc:  # one odd file must never stop a long run
                failed[position] = failure_reason(exc)
        self.fallbacks += batch.pillow + len(rescued)
        kept = sorted([*pictures, *rescued, *batch.decoded_items])
        if not kept:
            return ImageBatch([], [], None, failed)
        positions, sha256 = [batch.positions[k] for k in kept], [batch.sha256[k] for k in kept]
        if kept == batch.decoded_items:  # all decoded in the workers (a CPU device): nothing to place
            return ImageBatch(positions, sha256, [x.to(device) for x in batch.decoded], failed)
        row = {k: r for r, k in enumerate(kept)}

        def rows(items: list[int]) -> torch.Tensor:
            return torch.tensor([row[k] for k in items], device=device)

        images = []
        for index, preprocess in enumerate(self.preprocesses):
            out = torch.empty((len(kept), 3, preprocess.crop, preprocess.crop), dtype=torch.uint8, device=device)
            if pictures:
                out[rows(list(pictures))] = resize_all(preprocess, list(pictures.values()))
            if rescued:
                out[rows(list(rescued))] = torch.stack([tensors[index] for tensors in rescued.values()]).to(device)
            if batch.decoded is not None:
                out[rows(batch.decoded_items)] = batch.decoded[index].to(device)
            images.append(out)
        return ImageBatch(positions, sha256, images, failed)


def resize_all(preprocess: Preprocess, pictures: list[torch.Tensor]) -> torch.Tensor:
    """Upright (3, H, W) uint8 pictures of any sizes through `preprocess.tensor_to_uint8`, each size as
    one batch (an archive's images mostly share a few sizes): (N, 3, crop, crop) in their order."""
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, picture in enumerate(pictures):
        by_size.setdefault(tuple(picture.shape), []).append(k)
    shape = (len(pictures), 3, preprocess.crop, preprocess.crop)
    out = torch.empty(shape, dtype=torch.uint8, device=pictures[0].device)
    for ks in by_size.values():
        out[ks] = preprocess.tensor_to_uint8(torch.stack([pictures[k] for k in ks]))
    return out


DECODERS: dict[str, type] = {"pil": PilDecoder, "torch": TorchDecoder}
"""`extract --decode` choices: name -> decoder class, built with (files, preprocesses, the model's device)."""

AUTO_DECODE = "torch"
"""What `--decode auto` picks for a new store, on any device. On a GPU, nvJPEG lifts the bound of CPU
decoding. On a CPU the workers decode with libjpeg-turbo and torch's vectorised resize, faster per core
than Pillow, so `extract` ran faster on full-size JPEGs and no slower on small ones, where the model
bounds it (docs/results.md, measured by bench/decode.py)."""
