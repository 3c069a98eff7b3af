"""What fine-tuning reads: the split mapped onto the manifest's rows, the training augmentation, the
seeded loader of an epoch's images and the validation images decoded once. Every image goes through
`extract.dataset` (the one loader of image files), so decoding is the same as extraction's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from classify.finetune.config import FinetuneConfig, FinetuneError
from classify.runs import Run, run_split
from extract.dataset import ImageDataset, collate_images
from extract.manifest import Manifest
from extract.preprocess import Preprocess
from features.splits import UNUSED, SplitSpec, make_split, spec_from_name, split_for
from features.store import FeatureStore

__all__ = [
    "Rot90",
    "ValidationImages",
    "decoded_validation",
    "epoch_seed",
    "image_loader",
    "study_split",
    "train_transform",
]

log = logging.getLogger("classify")


class Rot90:
    """A random multiple of 90 degrees (with the flips: the 8 symmetries a dermoscopy image has)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rot90(x, int(torch.randint(0, 4, ())), dims=(-2, -1))


def train_transform(preprocess: Preprocess) -> v2.Compose:
    """What a practitioner uses for dermoscopy: random resized crops, flips, 90-degree rotations,
    mild colour jitter; uint8 out (normalised on the device like extraction's inputs)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(preprocess.crop, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
            v2.PILToTensor(),
            Rot90(),
        ]
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness: every epoch's draws depend on (seed, epoch) alone, which is
    what lets a resumed run repeat an uninterrupted one."""
    return seed * 100_003 + epoch


def image_loader(
    files: list[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    batch_size: int,
    workers: int = 0,
    seed: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Batches (`extract.dataset.ImageBatch`) of `files` through `transform`: shuffled by a generator
    seeded with `seed`, or in order when it is None."""
    return DataLoader(
        ImageDataset(files, transform),
        batch_size=batch_size,
        shuffle=seed is not None,
        num_workers=workers,
        collate_fn=collate_images,
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        pin_memory=pin_memory,
        drop_last=False,
    )


def study_split(cfg: FinetuneConfig, manifest: Manifest, init: Run | None) -> tuple[np.ndarray, SplitSpec]:
    """--init's split (the one that run recorded), or --features' split of the same recipe, mapped onto
    the manifest's rows; without either, the recipe made from the manifest."""
    spec = SplitSpec(cfg.test_fraction, cfg.folds, cfg.seed)
    if init and not cfg.features:
        recorded = run_split(init)
        by_id = dict(zip(recorded.image_id.tolist(), recorded.fold.tolist()))
        source, spec = str(init.folder), spec_from_name(init.card["split"])
    elif cfg.features:
        store = FeatureStore(cfg.features)
        by_id = dict(zip(store.column("image_id").tolist(), split_for(store, spec).tolist()))
        source = str(store.path)
    else:
        return make_split(np.array(manifest.label, dtype=object), np.array(manifest.group, dtype=object), spec), spec
    missing = sum(i not in by_id for i in manifest.image_id)
    if missing:
        log.warning("%d images of --data are not in the split of %s: they are left out", missing, source)
    return np.array([by_id.get(i, UNUSED) for i in manifest.image_id], dtype=np.int8), spec


@dataclass
class ValidationImages:
    """The validation rows that could be decoded, kept in memory for every epoch's score."""

    images: torch.Tensor
    """(N, 3, crop, crop) uint8 centre crops."""
    codes: np.ndarray
    """Their class codes."""
    rows: np.ndarray
    """Their rows of the manifest."""
    failed: dict[str, str]
    """Image id -> reason, for the validation rows that could not be decoded."""


def decoded_validation(
    manifest: Manifest, rows: np.ndarray, preprocess: Preprocess, codes: np.ndarray
) -> ValidationImages:
    """The validation images, decoded once (uint8, centre crop) and kept for every epoch's score."""
    dataset = ImageDataset([manifest.file(r) for r in rows], preprocess.to_uint8)
    images, kept, failed = [], [], {}
    for position in range(len(dataset)):
        _, _, image, reason = dataset[position]
        row = rows[position]
        if image is None:
            failed[manifest.image_id[row]] = reason
        else:
            images.append(image)
            kept.append(row)
    if not images:
        reason = next(iter(failed.values()), "there are none")
        raise FinetuneError(f"none of the {len(rows)} validation images could be read ({reason})")
    kept = np.array(kept, dtype=np.int64)
    return ValidationImages(torch.stack(images), codes[kept], kept, failed)
