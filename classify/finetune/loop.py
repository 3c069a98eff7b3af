"""One epoch of training and one score of the validation images: what both stages repeat."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from tqdm import tqdm

from classify.finetune.config import FinetuneConfig
from classify.finetune.data import ValidationImages, epoch_seed, image_loader, train_transform
from classify.finetune.model import Training
from classify.metrics import macro_auc
from extract.manifest import Manifest
from extract.preprocess import Preprocess
from extract.run import default_workers, resolve_device, resolve_precision
from extract.runtimes import PRECISIONS

__all__ = ["EpochStats", "Runtime", "Scores", "mixup", "train_epoch", "validate"]


@dataclass
class Runtime:
    """Where and how the network runs, the same for both stages: device, precision (autocast, and a
    gradient scaler for fp16 on CUDA), and the decoding processes of the training loader."""

    device: torch.device
    precision: str
    workers: int
    autocast: AbstractContextManager
    scaler: torch.amp.GradScaler | None

    @classmethod
    def of(cls, cfg: FinetuneConfig) -> Runtime:
        device = torch.device(resolve_device(cfg.device))
        precision = resolve_precision(cfg.precision, device.type)
        workers = cfg.workers if cfg.workers >= 0 else default_workers(device.type)
        autocast = (
            torch.autocast(device.type, dtype=PRECISIONS[precision])
            if precision != "fp32"
            else contextlib.nullcontext()
        )
        scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "fp16" else None
        return cls(device=device, precision=precision, workers=workers, autocast=autocast, scaler=scaler)


class EpochStats(NamedTuple):
    loss: float
    """Mean training loss per image of the epoch."""
    images_per_s: float


class Scores(NamedTuple):
    balanced_accuracy: float
    """At the argmax of the probabilities (before any decision offsets)."""
    auc: float
    """Macro one-vs-rest AUC: threshold-free, what picks the epoch."""
    proba: np.ndarray
    """Class probabilities of the validation images, row for row."""


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup: each image blended with another of the batch by a Beta(alpha, alpha) share; both labels kept."""
    if alpha <= 0:
        return x, y, y, 1.0
    share = float(torch.distributions.Beta(alpha, alpha).sample())
    other = torch.randperm(len(x), device=x.device)
    return share * x + (1 - share) * x[other], y, y[other], share


def _train_mode(training: Training, cfg: FinetuneConfig) -> None:
    training.model.train()
    for module in training.frozen:  # frozen blocks keep their batch-norm statistics
        module.eval()
    if cfg.bn == "frozen":
        for module in training.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_epoch(
    training: Training,
    runtime: Runtime,
    *,
    cfg: FinetuneConfig,
    epoch: int,
    manifest: Manifest,
    codes: np.ndarray,
    failed: dict[str, str],
) -> EpochStats:
    """One epoch over `training.rows`, its randomness (order, augmentation, mixup, dropout) seeded from
    (seed, epoch) so that a resumed run repeats an uninterrupted one. Images that cannot be decoded are
    added to `failed` (image id -> reason) and skipped."""
    seed = epoch_seed(cfg.seed, epoch)
    torch.manual_seed(seed)  # dropout and augmentation of this epoch
    rows, preprocess, device = training.rows, training.backbone.preprocess, runtime.device
    loader = image_loader(
        [manifest.file(r) for r in rows],
        train_transform(preprocess),
        batch_size=cfg.batch_size,
        workers=runtime.workers,
        seed=seed,
        pin_memory=device.type == "cuda",
    )
    _train_mode(training, cfg)
    model, optimizer, ema = training.model, training.optimizer, training.ema

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, y, weight=training.class_weight, label_smoothing=cfg.label_smoothing)

    total, seen, started = 0.0, 0, time.monotonic()
    progress = tqdm(
        total=len(rows),
        unit="img",
        desc=f"epoch {epoch}/{cfg.epochs}",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    for batch in loader:
        for p, reason in batch.failed.items():
            failed[manifest.image_id[rows[p]]] = reason
        if batch.images is None:
            continue
        positions = batch.positions
        x = preprocess.normalize(batch.images.to(device, non_blocking=True))
        x = x.contiguous(memory_format=torch.channels_last)
        x, y, y_other, share = mixup(x, torch.as_tensor(codes[rows[positions]], device=device), cfg.mixup)
        with runtime.autocast:
            logits = model(x).float()
        loss = share * loss_of(logits, y)
        if share < 1:
            loss = loss + (1 - share) * loss_of(logits, y_other)
        optimizer.zero_grad(set_to_none=True)
        if runtime.scaler is not None:
            runtime.scaler.scale(loss).backward()
            runtime.scaler.step(optimizer)
            runtime.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        training.scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.item() * len(positions)
        seen += len(positions)
        progress.update(len(positions) + len(batch.failed))
        progress.set_postfix(loss=f"{total / max(seen, 1):.4f}", refresh=False)
    progress.close()
    return EpochStats(total / max(seen, 1), seen / max(time.monotonic() - started, 1e-9))


def validate(
    model: nn.Module,
    validation: ValidationImages,
    *,
    preprocess: Preprocess,
    runtime: Runtime,
    classes: list[str],
    batch_size: int,
) -> Scores:
    """Balanced accuracy, AUC and class probabilities of the validation images (eval mode, centre crops)."""
    model.eval()
    probs = []
    with torch.inference_mode(), runtime.autocast:
        for start in range(0, len(validation.images), batch_size):
            batch = preprocess.normalize(validation.images[start : start + batch_size].to(runtime.device))
            batch = batch.contiguous(memory_format=torch.channels_last)
            probs.append(torch.softmax(model(batch).float(), dim=1).cpu().numpy())
    proba = np.concatenate(probs)
    codes = validation.codes
    with warnings.catch_warnings():  # a class predicted but absent from validation: its recall is undefined
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        score = float(balanced_accuracy_score(codes, proba.argmax(axis=1)))
    return Scores(score, macro_auc(np.array(classes, dtype=object)[codes], proba, classes), proba)
