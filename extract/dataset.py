"""Images as a torch Dataset: the one loader of image files that extraction, fine-tuning and the
benchmarks share, so that decoding (EXIF orientation, colour modes, bad files) is the same everywhere.

An item never raises: a file that cannot be used comes back as its reason, and the batch keeps the
images that could, so one odd file never stops a long run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from extract.images import failure_reason, load_image
from extract.preprocess import Preprocess

__all__ = ["EachPreprocess", "ImageBatch", "ImageDataset", "collate_images"]

Transform = Callable[[Image.Image], "torch.Tensor | list[torch.Tensor]"]


class EachPreprocess:
    """One decoded image through several preprocessings (one per distinct backbone input): decoded once,
    resized once per preprocessing. A class, not a lambda, so that DataLoader workers can pickle it."""

    def __init__(self, preprocesses: Sequence[Preprocess]):
        self.preprocesses = list(preprocesses)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [p.to_uint8(img) for p in self.preprocesses]


class ImageDataset(Dataset):
    """`files[i]` decoded by `load_image` and passed through `transform` (a PIL image to a uint8 tensor,
    or to a list of them). Item: (i, SHA-256 of the file, the transformed image or None, reason)."""

    def __init__(self, files: Sequence[Path], transform: Transform):
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, str, object, str]:
        try:
            img, sha256 = load_image(self.files[i])
            return i, sha256, self.transform(img), ""
        except Exception as exc:  # one odd file must never stop a long run
            return i, "", None, failure_reason(exc)


class ImageBatch(NamedTuple):
    """A batch of ImageDataset items: positions in the dataset of the good images, their SHA-256, their
    tensors stacked (one tensor, or one per element of a list transform; None when every image failed),
    and position -> reason for the images that could not be used."""

    positions: list[int]
    sha256: list[str]
    images: torch.Tensor | list[torch.Tensor] | None
    failed: dict[int, str]


def collate_images(items: list[tuple[int, str, object, str]]) -> ImageBatch:
    good = [item for item in items if item[2] is not None]
    failed = {i: reason for i, _, x, reason in items if x is None}
    if not good:
        return ImageBatch([], [], None, failed)
    first = good[0][2]
    if isinstance(first, list):
        images = [torch.stack([item[2][k] for item in good]) for k in range(len(first))]
    else:
        images = torch.stack([item[2] for item in good])
    return ImageBatch([item[0] for item in good], [item[1] for item in good], images, failed)
