"""`cli.py finetune`: the optional last stage. Unfreeze the top blocks of the backbone and train them
with the head, starting from what the study found (`--init RUN`).

Honest by construction: the split is the store's (or the same recipe made again from the same rows),
the test rows are never trained or early-stopped on, and fold 0 of the study rows is the lesion-grouped
validation part that picks the epoch. The result is a run folder like `fit`'s: the fine-tuned backbone
(`backbone.pt`, loadable by `extract --weights`), a head file, a store of fine-tuned embeddings
(`embeddings.h5`), and the report. The test figures come from that store through the same code as
`predict`, so `predict --run` reproduces them.

By default batch normalisation keeps its running statistics in every block, unfrozen ones included
(their scale and shift still train; `--bn train` lets the unfrozen blocks' statistics adapt): the head
starts from embeddings computed with those statistics, and batch statistics of 32 images move every
embedding at the first step (seen here: the training loss of a tuned linear head went from 0.4 to 1.2
in the first epoch with `--bn train` and a head rate of 1e-3).

Two stages: training on folds 1..K-1 with fold 0 validated after every epoch picks the number of
epochs; then (`--refit`, the default) the same training runs again from the start on every study row
for that many epochs and is the final model, as `fit` refits its best head on all study rows.

Faults: a checkpoint after every epoch of either stage (written to a temporary file, then renamed);
`--resume` goes on from it, and because every epoch's randomness is seeded from (seed, epoch), a
resumed run equals an uninterrupted one up to the nondeterminism of the kernels.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.base import clone
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from classify.heads import Head, LinearHead, MLPHead
from classify.inputs import InputSpec, fit_views, proba_views
from classify.metrics import balanced_offsets, default_positive, evaluate, macro_auc, shift_proba, threshold_of
from classify.report import write_report
from classify.runs import (
    Run,
    load_run,
    predictions_csv,
    run_split,
    save_run,
    save_split,
    weights_option,
    write_json,
    write_text,
)
from extract.backbones import Backbone, get_family, load_backbone
from extract.images import ImageError, load_image
from extract.manifest import Manifest, read_manifest
from extract.preprocess import Preprocess
from extract.run import PRECISIONS, ExtractConfig, default_workers, extract, resolve_device, resolve_precision
from features.splits import (
    TEST,
    UNUSED,
    SplitSpec,
    lesions_in_test,
    make_split,
    small_test,
    spec_from_name,
    split_counts,
    split_for,
)
from features.rows import read_embeddings
from features.store import FeatureStore

log = logging.getLogger("classify")

CHECKPOINT = "checkpoint.pt"
REFIT_CHECKPOINT = "refit-checkpoint.pt"
BEST = "best.pt"
BACKBONE_FILE = "backbone.pt"
STORE = "embeddings.h5"
VALIDATION_FOLD = 0
"""The fold of the study rows that picks the epoch; the other folds are trained on."""


class FinetuneError(ValueError):
    """Options or inputs that cannot work; raised before training, or a fault said clearly."""


@dataclass
class FinetuneConfig:
    """Every option of `cli.py finetune` and its default: the one place these defaults live."""

    data: str = ""
    images: str | None = None
    backbone: str = ""
    weights: str = "default"
    init: str | None = None
    """A `fit` run with a linear or mlp head on this backbone: the head to start from."""
    features: str | None = None
    """A feature store whose split to use (default: --init's store, else the split made again)."""
    out: str = ""
    unfreeze: str = "all"
    """How many blocks, counted from the top, are trained; `all` for the whole backbone."""
    epochs: int = 12
    patience: int = 6
    batch_size: int = 32
    lr: float | None = None
    """Learning rate of the head; default 3e-5 when it starts from --init's tuned head (below the
    backbone's: see docs/evaluation.md), 1e-3 for a fresh head (above it)."""
    backbone_lr: float = 1e-4
    """Learning rate of the unfrozen backbone blocks."""
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    bn: str = "frozen"
    """Batch-norm statistics of the unfrozen blocks: `train` (they adapt to the data) or `frozen`."""
    test_fraction: float = 0.2
    folds: int = 5
    allow_small_test: bool = False
    """Go on when the test part holds fewer than MIN_TEST_LESIONS lesions of a class (figures marked)."""
    seed: int = 0
    workers: int = -1
    device: str = "auto"
    precision: str = "auto"
    positive: str | None = None
    ema: float = 0.99
    """Decay per step of an exponential moving average of the weights, which is what is validated and
    kept (0: off). It smooths the noisy steps of a small data set."""
    mixup: float = 0.2
    """Alpha of mixup's Beta(alpha, alpha) mixing of image pairs and their labels (0: off)."""
    label_smoothing: float = 0.1
    tta: str = "d8"
    """Test-time views of the final embeddings (the run's store, and `predict`): none, flip or d8. d8
    (the mean embedding of the 8 flips and rotations, which training showed the network as
    augmentations) by default: on Lite0 / HAM10000 it raised the chosen epoch's validation AUC from
    0.9015 to 0.9056, for 8x the cost of the final embedding only (2.5 of 26 minutes)."""
    refit: bool = True
    """Once validation has picked the number of epochs, train again from the start on every study row
    (validation fold included) for that many epochs: the final model, as `fit` refits its best head
    on all study rows. Its validation figures are the chosen epoch's, made before the refit."""
    resume: bool = False


# ----------------------------------------------------------------------------------------- model


class Standardize(nn.Module):
    """(x - mean) / scale with fixed statistics (those an MLP head was fitted with)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def head_module(head: Head | None, n_classes: int, stats: tuple[np.ndarray, np.ndarray] | None = None) -> nn.Module:
    """The classifier as a torch module, standardisation first (as the heads were fitted, which keeps
    the optimiser's steps well scaled): a fitted linear head (the same probabilities), a fitted MLP,
    or, without one, a zero-initialised linear layer on embeddings standardised with `stats`."""
    if head is None:
        mean, scale = stats
        linear = nn.Linear(len(mean), n_classes)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(Standardize(mean, scale), linear)
    if isinstance(head, LinearHead):
        weight, bias = head.coef_, head.intercept_
        if weight.shape[0] == 1:  # binary: logits (0, s) give softmax = (1 - sigmoid(s), sigmoid(s))
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        linear = nn.Linear(weight.shape[1], n_classes)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return nn.Sequential(Standardize(head.mean_, head.scale_), linear)
    if isinstance(head, MLPHead):
        return nn.Sequential(Standardize(head.mean_, head.scale_), copy.deepcopy(head.model_))
    raise FinetuneError(f"--init: a {head.name} head cannot be fine-tuned; fit a linear or mlp head")


def head_file(module: nn.Sequential, classes: list[str], init: Head | None) -> Head:
    """The trained classifier as a saved-head object (the formats `fit` writes)."""
    standardize, inner = module
    if isinstance(inner, nn.Linear):
        head = LinearHead()
        head.coef_ = inner.weight.detach().double().numpy()
        head.intercept_ = inner.bias.detach().double().numpy()
    else:
        head = MLPHead(**init.get_params())
        head.model_ = inner.eval()
    head.mean_, head.scale_ = standardize.mean.double().numpy(), standardize.scale.double().numpy()
    head.classes_ = np.array(classes, dtype=object)
    return head


class Model(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())


def trainable_blocks(backbone: Backbone, unfreeze: str) -> tuple[list[nn.Module], list[nn.Module]]:
    """(frozen, trainable) blocks: the last `unfreeze` blocks of the registry's list, or all."""
    blocks = get_family(backbone.name).blocks(backbone.module)
    if unfreeze == "all":
        n = len(blocks)
    else:
        try:
            n = int(unfreeze)
        except ValueError:
            raise FinetuneError(f"--unfreeze {unfreeze!r}: a number of blocks or 'all'") from None
        if not 1 <= n <= len(blocks):
            raise FinetuneError(f"--unfreeze {n}: {backbone.name} has {len(blocks)} blocks (1..{len(blocks)} or all)")
    flat = lambda groups: [m for group in groups for m in group]  # noqa: E731
    return flat(blocks[: len(blocks) - n]), flat(blocks[len(blocks) - n :])


# ----------------------------------------------------------------------------------------- data


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


class _Images(Dataset):
    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            img, _ = load_image(self.files[i])
            return i, self.transform(img), ""
        except ImageError as exc:
            return i, None, str(exc)


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, {i: reason for i, x, reason in items if x is None}


# ----------------------------------------------------------------------------------------- split


def _split(cfg: FinetuneConfig, manifest: Manifest, init: Run | None) -> tuple[np.ndarray, SplitSpec]:
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


# ----------------------------------------------------------------------------------------- faults


def _save(obj, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise FinetuneError(
                f"the disk is full: could not write {path}. Free some space, then rerun with --resume "
                f"(the last complete checkpoint is kept)."
            ) from None
        raise


# ----------------------------------------------------------------------------------------- training


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured; return the metrics written to RUN/metrics.json."""
    started = time.monotonic()
    if not cfg.out:
        raise FinetuneError("--out RUN: name the run folder")
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=3e-5 if cfg.init else 1e-3)
    run_dir = Path(cfg.out)
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.exists() and not cfg.resume:
        raise FinetuneError(
            f"{run_dir} holds a fine-tuning checkpoint: pass --resume to continue it, or choose another --out"
        )
    if cfg.resume and not checkpoint_path.exists():
        raise FinetuneError(f"--resume: {checkpoint_path} does not exist")
    init = load_run(cfg.init) if cfg.init else None
    weights = _init_checks(cfg, init)
    manifest = read_manifest(cfg.data, cfg.images)
    split, split_spec = _split(cfg, manifest, init)
    labels = np.array(manifest.label, dtype=object)
    split[labels == ""] = UNUSED
    classes = list(init.classes) if init else sorted(set(labels[split != UNUSED]))
    unknown = sorted(set(labels[split != UNUSED]) - set(classes))
    if unknown:
        raise FinetuneError(f"labels {', '.join(unknown)} are not classes of --init ({', '.join(classes)})")
    warning = small_test(lesions_in_test(labels, np.array(manifest.group, dtype=object), split))
    if warning and not cfg.allow_small_test:
        raise FinetuneError(
            f"{warning}. Raise --test-fraction or use more data, or pass --allow-small-test to go on "
            "with every figure marked"
        )
    train_rows = np.flatnonzero((split >= 0) & (split != VALIDATION_FOLD))
    val_rows = np.flatnonzero(split == VALIDATION_FOLD)
    if not len(train_rows) or not len(val_rows):
        raise FinetuneError("no training or validation rows: the data set is too small for this split")

    device = torch.device(resolve_device(cfg.device))
    precision = resolve_precision(cfg.precision, device.type)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(device.type)
    codes = np.array([classes.index(c) if c in classes else -1 for c in labels])
    start_head = _refit_without_validation(init, manifest, train_rows) if init else None
    t = _training(cfg, weights, start_head, manifest, train_rows, codes, len(classes), device)
    backbone, model, ema, scored = t.backbone, t.model, t.ema, t.scored
    if init:
        _check_same_extraction(backbone, init)
    autocast = (
        torch.autocast(device.type, dtype=PRECISIONS[precision]) if precision != "fp32" else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and precision == "fp16" else None
    val_x, val_codes, failed = _decoded(manifest, val_rows, backbone.preprocess, codes)

    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("resume", "workers", "device")}
    history: list[dict] = []
    best = {"epoch": -1, "auc": -1.0}
    start_epoch, waited = 1, 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["options"] != options:
            changed = sorted(k for k in options if state["options"].get(k) != options[k])
            raise FinetuneError(f"--resume: the checkpoint was made with other options ({', '.join(changed)})")
        if "auc" not in state["best"]:
            raise FinetuneError(
                f"--resume: {checkpoint_path} was written by an older version that chose epochs "
                "by balanced accuracy; start again with another --out"
            )
        t.load(state)
        history, best, waited = state["history"], state["best"], state["waited"]
        failed.update(state["failed"])
        start_epoch = state["epoch"] + 1
        log.info("resuming %s after epoch %d", run_dir, state["epoch"])
    else:
        score, auc, _ = _validate(
            scored, val_x, val_codes, backbone.preprocess, device, autocast, classes, cfg.batch_size
        )
        history.append({"epoch": 0, "loss": None, "val_balanced_accuracy": score, "val_auc": auc, "images_per_s": None})
        best = {"epoch": 0, "auc": _comparable(auc)}
        _save(scored.state_dict(), run_dir / BEST)
        log.info("epoch 0 (as initialised): validation AUC %.4f, balanced accuracy %.4f", auc, score)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if waited >= cfg.patience:
            break
        loss, speed = _epoch(t, cfg, epoch, manifest, codes, workers, device, autocast, scaler, failed)
        score, auc, _ = _validate(
            scored, val_x, val_codes, backbone.preprocess, device, autocast, classes, cfg.batch_size
        )
        history.append(
            {"epoch": epoch, "loss": loss, "val_balanced_accuracy": score, "val_auc": auc, "images_per_s": speed}
        )
        if _comparable(auc) > best["auc"]:
            best, waited = {"epoch": epoch, "auc": _comparable(auc)}, 0
            _save(scored.state_dict(), run_dir / BEST)
        else:
            waited += 1
        log.info(
            "epoch %d/%d: loss %.4f, %.1f images/s, validation AUC %.4f (best %.4f at epoch %d), balanced accuracy "
            "%.4f at the argmax",
            epoch,
            cfg.epochs,
            loss,
            speed,
            auc,
            best["auc"],
            best["epoch"],
            score,
        )
        _save(
            {
                "epoch": epoch,
                **t.state(),
                "history": history,
                "best": best,
                "waited": waited,
                "failed": failed,
                "options": options,
            },
            checkpoint_path,
        )

    model.load_state_dict(torch.load(run_dir / BEST, map_location=device, weights_only=True))
    # The decision rule is set after the epoch is chosen, on the same validation rows: class offsets of
    # the logits that maximise balanced accuracy there (for two classes, the positive-class threshold).
    _, _, val_proba = _validate(model, val_x, val_codes, backbone.preprocess, device, autocast, classes, cfg.batch_size)
    offsets = balanced_offsets(val_codes, val_proba)
    kept = np.array([r for r in val_rows if manifest.image_id[r] not in failed], dtype=np.int64)
    validation = (kept, shift_proba(val_proba, offsets))
    refit = None
    if cfg.refit and best["epoch"] > 0:
        del t, model, ema, scored  # the first stage's weights: the refit starts afresh
        model, refit = _refit(
            cfg,
            weights,
            init,
            manifest,
            np.flatnonzero(split >= 0),
            codes,
            len(classes),
            best["epoch"],
            options,
            device,
            autocast,
            scaler,
            workers,
            failed,
            run_dir,
        )
    shift_logits(model.head, offsets)
    decision = {"offsets": [float(v) for v in offsets], "classes": classes}
    if len(classes) == 2:
        decision["threshold"] = {classes[1]: threshold_of(offsets)}
    metrics = _finish(
        cfg,
        run_dir,
        manifest,
        model,
        backbone,
        classes,
        init,
        split,
        split_spec,
        precision,
        history,
        best,
        failed,
        started,
        refit,
        validation,
        decision,
    )
    return metrics


def _comparable(auc: float) -> float:
    """An AUC that can be compared (NaN, when validation lacks a class, ranks below every number)."""
    return -1.0 if np.isnan(auc) else float(auc)


def shift_logits(head: nn.Module, offsets: np.ndarray) -> None:
    """Add the class offsets to the bias of the head's last linear layer: its argmax is then the
    decision rule chosen on validation (softmax(z + b) ranks classes as log p + b does)."""
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(torch.as_tensor(offsets, dtype=last.bias.dtype, device=last.bias.device))


@dataclass
class _Training:
    """One stage's model and optimisation state: what an epoch updates and a checkpoint holds."""

    backbone: Backbone
    model: Model
    frozen: list[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.optim.swa_utils.AveragedModel | None
    class_weight: torch.Tensor
    rows: np.ndarray

    @property
    def scored(self) -> nn.Module:
        """What is validated, kept and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        return {**state, **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _training(
    cfg: FinetuneConfig,
    weights: str,
    head: Head | None,
    manifest: Manifest,
    rows: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    device: torch.device,
) -> _Training:
    """A stage's fresh start: the backbone with its top blocks unfrozen, the head (`head`, or a fresh one
    standardised on the rows' embeddings), class weights of `rows`, AdamW, the schedule, the average."""
    backbone = load_backbone(cfg.backbone, weights)
    frozen, trainable = trainable_blocks(backbone, cfg.unfreeze)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    stats = None if head else _embedding_stats(backbone, [manifest.file(r) for r in rows], device, cfg)
    model = Model(backbone.module, head_module(head, n_classes, stats))
    model.to(device, memory_format=torch.channels_last)
    counts = np.bincount(codes[rows], minlength=n_classes)
    class_weight = torch.tensor(len(rows) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    optimizer = _optimizer(model, trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, math.ceil(len(rows) / cfg.batch_size)))
    return _Training(backbone, model, frozen, optimizer, scheduler, _ema(model, cfg.ema), class_weight, rows)


def _epoch(
    t: _Training,
    cfg: FinetuneConfig,
    epoch: int,
    manifest: Manifest,
    codes: np.ndarray,
    workers: int,
    device: torch.device,
    autocast,
    scaler,
    failed: dict[str, str],
) -> tuple[float, float]:
    """One epoch of a stage, its randomness seeded from (seed, epoch); returns the loss and images/s."""
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # dropout and augmentation of this epoch
    loader = DataLoader(
        _Images([manifest.file(r) for r in t.rows], train_transform(t.backbone.preprocess)),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch),
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    return _train_epoch(
        t.model,
        t.frozen,
        cfg,
        t.ema,
        loader,
        t.rows,
        codes,
        t.class_weight,
        t.optimizer,
        t.scheduler,
        autocast,
        scaler,
        t.backbone.preprocess,
        device,
        failed,
        manifest,
        epoch,
    )


def _refit(
    cfg: FinetuneConfig,
    weights: str,
    init: Run | None,
    manifest: Manifest,
    rows: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    epochs: int,
    options: dict,
    device: torch.device,
    autocast,
    scaler,
    workers: int,
    failed: dict[str, str],
    run_dir: Path,
) -> tuple[nn.Module, dict]:
    """The second stage: the first stage's training from the start on `rows` (every study row) for the
    `epochs` that validation chose, from --init's head as `fit` made it (on all study rows), or a fresh
    one. Resumable from its own checkpoint. Returns the model to keep (the average when there is one)
    and what to record of the stage."""
    t = _training(cfg, weights, init.head if init else None, manifest, rows, codes, n_classes, device)
    path, losses, start = run_dir / REFIT_CHECKPOINT, [], 1
    if path.exists():  # only ever written by this run's own first stage ending (options were checked)
        state = torch.load(path, map_location=device, weights_only=True)
        if state["options"] == options:
            t.load(state)
            losses, start = state["losses"], state["epoch"] + 1
            failed.update(state["failed"])
            log.info("resuming the refit after epoch %d", state["epoch"])
    log.info("refit on all %d study rows for the %d epochs validation chose", len(rows), epochs)
    for epoch in range(start, epochs + 1):
        loss, speed = _epoch(t, cfg, epoch, manifest, codes, workers, device, autocast, scaler, failed)
        losses.append(loss)
        log.info("refit epoch %d/%d: loss %.4f, %.1f images/s", epoch, epochs, loss, speed)
        _save({"epoch": epoch, **t.state(), "losses": losses, "failed": failed, "options": options}, path)
    return t.scored, {"epochs": epochs, "rows": len(rows), "losses": losses}


def _init_checks(cfg: FinetuneConfig, init: Run | None) -> str:
    """The weights option to load; with --init, the run's own (and its inputs must be one backbone)."""
    if init is None:
        return cfg.weights
    inputs: InputSpec = init.inputs
    if inputs.backbones != (cfg.backbone,):
        raise FinetuneError(f"--init {cfg.init} was fitted on {', '.join(inputs.backbones)}, not {cfg.backbone}")
    if inputs.meta:
        raise FinetuneError(
            f"--init {cfg.init} uses metadata ({', '.join(inputs.meta)}); fine-tuning takes images only"
        )
    recorded = init.card["extraction"][cfg.backbone]
    if recorded.get("views") not in (None, "none"):
        raise FinetuneError(
            f"--init {cfg.init} was fitted on test-time views ({recorded['views']}); fit one on single views"
        )
    return weights_option(cfg.backbone, recorded, init.folder)


def _refit_without_validation(init: Run, manifest: Manifest, train_rows: np.ndarray) -> Head:
    """The --init head refitted, with its tuned parameters, on the training rows only.

    `fit` refits its best head on all study rows, validation fold included; started from that head,
    epoch 0 would be scored on rows the head has seen and look better than it is, and checkpoint
    selection would favour it. Refitted on the frozen embeddings of the training rows, epoch 0 is
    the frozen pipeline scored as honestly as every later epoch.
    """
    store = FeatureStore(init.card["store"])
    samples = store.samples()
    row_of = {image_id: row for row, image_id in enumerate(samples.image_id)}
    rows = np.array([row_of[manifest.image_id[r]] for r in train_rows if manifest.image_id[r] in row_of])
    x = read_embeddings(store, init.inputs.backbones, all_views=init.inputs.all_views)[rows]
    y = np.array(samples.label, dtype=object)[rows]
    groups = np.array(samples.group, dtype=object)[rows]
    head = clone(init.head)
    fit_views(head, x, y, groups)
    return head


def _check_same_extraction(backbone: Backbone, init: Run) -> None:
    """Same weights and preprocessing as the store the head was fitted on (precision may differ)."""
    recorded = json.loads(init.card["extraction"][backbone.name]["identity"])
    mine = backbone.identity()
    differ = [k for k in mine if recorded.get(k) != mine[k]]
    if differ:
        raise FinetuneError(
            f"--init {init.folder}: its {backbone.name} embeddings were made with other "
            + ", ".join(f"{k} ({recorded.get(k)!r} vs {mine[k]!r})" for k in differ)
        )


def _embedding_stats(backbone: Backbone, files: list[Path], device, cfg: FinetuneConfig):
    """Mean and spread of the training images' embeddings: the standardisation of a fresh head."""
    loader = DataLoader(_Images(files, backbone.preprocess.to_uint8), batch_size=cfg.batch_size, collate_fn=_collate)
    module = backbone.module.to(device).eval()
    parts = []
    with torch.inference_mode():
        for _, batch, _ in loader:
            if batch is not None:
                parts.append(module(backbone.preprocess.normalize(batch.to(device))).float().cpu().numpy())
    x = np.concatenate(parts)
    return x.mean(axis=0), x.std(axis=0) + 1e-6


def _optimizer(model: Model, trainable: list[nn.Module], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; the backbone at a lower rate than the head; no weight decay on norms and biases."""
    groups = []
    for params, lr in (
        ([p for m in trainable for p in m.parameters()], cfg.backbone_lr),
        (list(model.head.parameters()), cfg.lr),
    ):
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": rest, "lr": lr, "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _schedule(cfg: FinetuneConfig, steps_per_epoch: int):
    """Linear warm-up, then cosine decay to zero at the last step."""
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return factor


def _decoded(manifest: Manifest, rows: np.ndarray, preprocess: Preprocess, codes: np.ndarray):
    """The validation images, decoded once (uint8, centre crop) and kept for every epoch's score."""
    images, kept, failed = [], [], {}
    for r in rows:
        try:
            img, _ = load_image(manifest.file(r))
            images.append(preprocess.to_uint8(img))
            kept.append(codes[r])
        except ImageError as exc:
            failed[manifest.image_id[r]] = str(exc)
    return torch.stack(images), np.array(kept), failed


def _mix(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup: each image blended with another of the batch by a Beta(alpha, alpha) share; both labels kept."""
    if alpha <= 0:
        return x, y, y, 1.0
    share = float(torch.distributions.Beta(alpha, alpha).sample())
    other = torch.randperm(len(x), device=x.device)
    return share * x + (1 - share) * x[other], y, y[other], share


def _ema(model: Model, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """A moving average of every weight and buffer (torch's own), or None when --ema is 0."""
    if decay <= 0:
        return None
    multi_avg = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=multi_avg, use_buffers=True)


def _train_epoch(
    model,
    frozen,
    cfg,
    ema,
    loader,
    rows,
    codes,
    class_weight,
    optimizer,
    scheduler,
    autocast,
    scaler,
    preprocess,
    device,
    failed,
    manifest,
    epoch,
) -> tuple[float, float]:
    model.train()
    for module in frozen:  # frozen blocks keep their batch-norm statistics
        module.eval()
    if cfg.bn == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    total, seen, started = 0.0, 0, time.monotonic()
    progress = tqdm(
        total=len(rows),
        unit="img",
        desc=f"epoch {epoch}/{cfg.epochs}",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
    )
    for positions, batch, failures in loader:
        for p, reason in failures.items():
            failed[manifest.image_id[rows[p]]] = reason
        if batch is None:
            continue
        x = preprocess.normalize(batch.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        x, y, y_other, share = _mix(x, torch.as_tensor(codes[rows[positions]], device=device), cfg.mixup)
        with autocast:
            logits = model(x).float()
        loss = share * nn.functional.cross_entropy(logits, y, weight=class_weight, label_smoothing=cfg.label_smoothing)
        if share < 1:
            loss = loss + (1 - share) * nn.functional.cross_entropy(
                logits, y_other, weight=class_weight, label_smoothing=cfg.label_smoothing
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        total += loss.item() * len(positions)
        seen += len(positions)
        progress.update(len(positions) + len(failures))
        progress.set_postfix(loss=f"{total / max(seen, 1):.4f}", refresh=False)
    progress.close()
    return total / max(seen, 1), seen / max(time.monotonic() - started, 1e-9)


def _validate(model, x, codes, preprocess, device, autocast, classes, batch_size) -> tuple[float, float, np.ndarray]:
    """Balanced accuracy, AUC and class probabilities of the validation part (eval mode, centre crops)."""
    model.eval()
    probs = []
    with torch.inference_mode(), autocast:
        for start in range(0, len(x), batch_size):
            batch = preprocess.normalize(x[start : start + batch_size].to(device)).contiguous(
                memory_format=torch.channels_last
            )
            probs.append(torch.softmax(model(batch).float(), dim=1).cpu().numpy())
    proba = np.concatenate(probs)
    predicted = proba.argmax(axis=1)
    score = float(np.mean([np.mean(predicted[codes == k] == k) for k in np.unique(codes)]))
    return score, macro_auc(np.array(classes, dtype=object)[codes], proba, classes), proba


# ----------------------------------------------------------------------------------------- results


def _finish(
    cfg,
    run_dir,
    manifest,
    model,
    backbone,
    classes,
    init,
    split,
    split_spec,
    precision,
    history,
    best,
    failed,
    started,
    refit: dict | None,
    validation: tuple[np.ndarray, np.ndarray],
    decision: dict,
) -> dict:
    """Save the fine-tuned backbone and head, embed the data set with them (the run's store), score the
    test rows from that store; report the chosen epoch's validation predictions (made before any refit,
    with the decision rule set on them), and write the run folder as `fit` does."""
    model.cpu().eval()
    _save(model.backbone.state_dict(), run_dir / BACKBONE_FILE)
    head = head_file(model.head, classes, init.head if init else None)
    store_path = run_dir / STORE
    if store_path.exists():
        store_path.unlink()  # a rerun after a crash in this step starts the store afresh
    summary = extract(
        ExtractConfig(
            backbone=backbone.name,
            weights=str(run_dir / BACKBONE_FILE),
            out=str(store_path),
            precision=precision,
            tta=cfg.tta,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            device=cfg.device,
        ),
        manifest=manifest,
    )
    failed.update(summary.failed)
    store = FeatureStore(store_path)
    ids = np.array(store.samples().image_id, dtype=object)
    labels = np.array(store.samples().label, dtype=object)
    groups = np.array(store.samples().group, dtype=object)
    x = store.embeddings(backbone.name)
    done = store.done(backbone.name)
    positive = cfg.positive or default_positive(classes)
    majority = max(classes, key=lambda c: (np.sum(labels[split >= 0] == c), c))
    metrics, proba_of = {}, {}
    for part, rows in (("test", (split == TEST) & done), ("validation", (split == VALIDATION_FOLD) & done)):
        if part == "validation":
            kept, proba = validation
            row_of = {image_id: row for row, image_id in enumerate(ids)}
            rows = np.array([row_of[manifest.image_id[r]] for r in kept], dtype=np.int64)
        else:
            proba = proba_views(head, x[rows])
        proba_of[part] = (ids[rows], labels[rows], proba)
        metrics[part] = evaluate(labels[rows], proba, classes, groups[rows], positive, majority, cfg.seed)
    warning = small_test(lesions_in_test(labels, groups, split))
    if warning:
        metrics["warning"] = metrics["test"]["warning"] = metrics["validation"]["warning"] = warning
    attrs = store.backbone_attrs(backbone.name)
    card = {
        "kind": "finetune",
        "store": str(store_path.resolve()),
        "split": split_spec.name,
        "split_digest": save_split(run_dir, ids, np.where(done, split, UNUSED), store.column("sha256")),
        "inputs": InputSpec((backbone.name,)).as_dict(),
        "meta_encoder": {},
        "extraction": {
            backbone.name: {
                k: attrs.get(k)
                for k in ("weights", "weights_sha256", "precision", "views", "runtime", "fingerprint", "identity")
            }
        },
        "positive": positive,
        "majority": majority,
        "init": str(Path(cfg.init).resolve()) if cfg.init else None,
        "unfreeze": cfg.unfreeze,
        "best_epoch": best["epoch"],
        "decision": decision,
    }
    save_run(run_dir, head, card)
    config = {
        **dataclasses.asdict(cfg),
        "kind": "finetune",
        "head": head.name,
        "backbone": backbone.name,
        "features": str(store_path),
        "views": "mean" if cfg.tta == "none" else f"mean of {cfg.tta} views",
        "meta": "",
        "split": split_spec.name,
        "precision": precision,
        "best_epoch": best["epoch"],
        "chosen_by": "validation AUC",
        "decision": decision,
        "refit": refit,
        "params": {
            k: cfg.__dict__[k] for k in ("unfreeze", "lr", "backbone_lr", "weight_decay", "epochs", "batch_size")
        },
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "seconds": round(time.monotonic() - started, 1),
    }
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "history.json", history)
    write_json(run_dir / "metrics.json", metrics)
    for part, (part_ids, _, proba) in proba_of.items():
        write_text(run_dir / f"{part}_predictions.csv", predictions_csv(part_ids, proba, classes))
    _, labels_t, proba_t = proba_of["test"]
    if failed:
        write_text(run_dir / "failed.csv", "image,reason\n" + "".join(f"{i},{r}\n" for i, r in failed.items()))
        log.warning("%d images could not be used (listed in %s)", len(failed), run_dir / "failed.csv")
    counts = split_counts(split, labels)
    write_report(run_dir, metrics, config, history, counts, test_labels=labels_t, test_proba=proba_t)
    return metrics
