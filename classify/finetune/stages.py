"""The two stages of a fine-tuning and the command that runs them.

The first stage trains on folds 1..K-1 and scores fold 0 after every epoch: the best validation AUC
picks the epoch (and so the number of epochs), and the decision rule is then set on those rows. The
refit (`--refit`, the default) runs the same training again from the start on every study row for that
many epochs: the final model, as `fit` refits its best head on all study rows. Each stage checkpoints
after every epoch and goes on from its checkpoint with `--resume`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from classify.finetune.checkpoint import Checkpoint
from classify.finetune.config import (
    BEST,
    CHECKPOINT,
    LATER_OPTIONS,
    REFIT_CHECKPOINT,
    VALIDATION_FOLD,
    FinetuneConfig,
    FinetuneError,
)
from classify.finetune.data import decoded_validation, study_split
from classify.finetune.initial import (
    check_same_extraction,
    init_options,
    init_weights,
    refit_without_validation,
)
from classify.finetune.loop import Runtime, Scores, train_epoch, validate
from classify.finetune.model import Model, build_training, shift_logits
from classify.finetune.results import Finished, write_run_folder
from classify.metrics import balanced_offsets, shift_proba, threshold_of
from classify.runs import Run, load_run
from extract.manifest import Manifest, read_manifest
from features.splits import UNUSED, lesions_in_test, small_test
from features.store import stored_name

__all__ = ["Chosen", "Job", "comparable_auc", "finetune", "first_stage", "refit_stage"]

log = logging.getLogger("classify")


@dataclass
class Job:
    """What both stages share: the options and their resolved inputs, where the run lies, and the
    images that could not be used so far (image id -> reason, added to by every epoch)."""

    cfg: FinetuneConfig
    weights: str
    """The weights option the backbone loads (--init's own with --init)."""
    init: Run | None
    manifest: Manifest
    codes: np.ndarray
    """Class code of each manifest row (-1 without a class)."""
    classes: list[str]
    runtime: Runtime
    run_dir: Path
    options: dict
    """The options a checkpoint records: all but those that never change a result."""
    failed: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass
class Chosen:
    """What the first stage leaves: the model with the chosen epoch's weights, and what it was chosen on."""

    model: Model | None
    backbone: str
    history: list[dict]
    best_epoch: int
    offsets: np.ndarray
    """Class offsets of the logits that maximise balanced accuracy on the validation rows."""
    validation: tuple[np.ndarray, np.ndarray]
    """(manifest rows, probabilities with the offsets) of the validation images at the chosen epoch."""


def checkpoint_options(cfg: FinetuneConfig) -> dict:
    """The options a checkpoint records: all but those that never change a result. An option added
    after checkpoints were first written (`LATER_OPTIONS`) is recorded only when it differs from its
    default, so that a checkpoint written before it existed still resumes."""
    defaults = FinetuneConfig()
    return {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("resume", "workers", "device") and not (k in LATER_OPTIONS and v == getattr(defaults, k))
    }


def comparable_auc(auc: float) -> float:
    """An AUC that can be compared (NaN, when validation lacks a class, ranks below every number)."""
    return -1.0 if np.isnan(auc) else float(auc)


def first_stage(job: Job, *, train_rows: np.ndarray, val_rows: np.ndarray) -> Chosen:
    """Train on `train_rows`, score `val_rows` after every epoch (epoch 0: as initialised), keep the
    epoch of the best validation AUC in best.pt, stop after --patience epochs without a better one;
    then set the decision rule on the validation rows at that epoch. Resumable from its checkpoint."""
    cfg, runtime, manifest, init = job.cfg, job.runtime, job.manifest, job.init
    start_head = refit_without_validation(init, manifest, train_rows) if init else None
    t = build_training(
        cfg,
        job.weights,
        start_head,
        manifest=manifest,
        rows=train_rows,
        codes=job.codes,
        n_classes=len(job.classes),
        device=runtime.device,
    )
    if init:
        check_same_extraction(t.backbone, init)
    preprocess = t.backbone.preprocess
    val = decoded_validation(manifest, val_rows, preprocess, job.codes)
    job.failed.update(val.failed)

    def scores(model: nn.Module) -> Scores:
        return validate(
            model, val, preprocess=preprocess, runtime=runtime, classes=job.classes, batch_size=cfg.batch_size
        )

    checkpoint = Checkpoint(job.run_dir / CHECKPOINT, job.options)
    best_file = Checkpoint(job.run_dir / BEST)
    history: list[dict] = []
    best = {"epoch": -1, "auc": -1.0}
    start_epoch, waited = 1, 0
    job.run_dir.mkdir(parents=True, exist_ok=True)
    state = checkpoint.resume(runtime.device) if cfg.resume else None
    if state is not None:
        t.load(state)
        history, best, waited = state["history"], state["best"], state["waited"]
        job.failed.update(state["failed"])
        start_epoch = state["epoch"] + 1
        log.info("resuming %s after epoch %d", job.run_dir, state["epoch"])
    else:
        score, auc, _ = scores(t.scored)
        history.append({"epoch": 0, "loss": None, "val_balanced_accuracy": score, "val_auc": auc, "images_per_s": None})
        best = {"epoch": 0, "auc": comparable_auc(auc)}
        best_file.save(t.scored.state_dict())
        log.info("epoch 0 (as initialised): validation AUC %.4f, balanced accuracy %.4f", auc, score)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if waited >= cfg.patience:
            break
        loss, speed = train_epoch(
            t, runtime, cfg=cfg, epoch=epoch, manifest=manifest, codes=job.codes, failed=job.failed
        )
        score, auc, _ = scores(t.scored)
        history.append(
            {"epoch": epoch, "loss": loss, "val_balanced_accuracy": score, "val_auc": auc, "images_per_s": speed}
        )
        if comparable_auc(auc) > best["auc"]:
            best, waited = {"epoch": epoch, "auc": comparable_auc(auc)}, 0
            best_file.save(t.scored.state_dict())
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
        checkpoint.save(
            {
                "epoch": epoch,
                **t.state(),
                "history": history,
                "best": best,
                "waited": waited,
                "failed": job.failed,
            }
        )

    model = t.model
    model.load_state_dict(best_file.load(runtime.device))
    # The decision rule is set after the epoch is chosen, on the same validation rows: class offsets of
    # the logits that maximise balanced accuracy there (for two classes, the positive-class threshold).
    val_proba = scores(model).proba
    offsets = balanced_offsets(val.codes, val_proba)
    return Chosen(
        model=model,
        backbone=t.backbone.name,
        history=history,
        best_epoch=best["epoch"],
        offsets=offsets,
        validation=(val.rows, shift_proba(val_proba, offsets)),
    )


def refit_stage(job: Job, *, rows: np.ndarray, epochs: int) -> tuple[nn.Module, dict]:
    """The second stage: the first stage's training from the start on `rows` (every study row) for the
    `epochs` that validation chose, from --init's head as `fit` made it (on all study rows), or a fresh
    one. Resumable from its own checkpoint. Returns the model to keep (the average when there is one)
    and what to record of the stage."""
    cfg, runtime = job.cfg, job.runtime
    t = build_training(
        cfg,
        job.weights,
        job.init.head if job.init else None,
        manifest=job.manifest,
        rows=rows,
        codes=job.codes,
        n_classes=len(job.classes),
        device=runtime.device,
    )
    checkpoint = Checkpoint(job.run_dir / REFIT_CHECKPOINT, job.options)
    losses, start = [], 1
    # Only ever written by this run's own first stage ending, whose options were checked: one made
    # with other options is passed over and the refit starts afresh.
    state = checkpoint.resume(runtime.device, other_options="restart")
    if state is not None:
        t.load(state)
        losses, start = state["losses"], state["epoch"] + 1
        job.failed.update(state["failed"])
        log.info("resuming the refit after epoch %d", state["epoch"])
    log.info("refit on all %d study rows for the %d epochs validation chose", len(rows), epochs)
    for epoch in range(start, epochs + 1):
        loss, speed = train_epoch(
            t, runtime, cfg=cfg, epoch=epoch, manifest=job.manifest, codes=job.codes, failed=job.failed
        )
        losses.append(loss)
        log.info("refit epoch %d/%d: loss %.4f, %.1f images/s", epoch, epochs, loss, speed)
        checkpoint.save({"epoch": epoch, **t.state(), "losses": losses, "failed": job.failed})
    return t.scored, {"epochs": epochs, "rows": len(rows), "losses": losses}


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune as configured; return the metrics written to RUN/metrics.json."""
    started = time.monotonic()
    if not cfg.out:
        raise FinetuneError("--out RUN: name the run folder")
    if cfg.lr is None:
        cfg = dataclasses.replace(cfg, lr=3e-5 if cfg.init else 1e-3)
    cfg = dataclasses.replace(cfg, backbone=stored_name(cfg.backbone))  # as stores and run cards spell it
    run_dir = Path(cfg.out)
    Checkpoint(run_dir / CHECKPOINT).check_start(cfg.resume)
    init = load_run(cfg.init) if cfg.init else None
    cfg = init_options(cfg, init)
    cfg.backbone_options()  # refused now, not after the split is made
    weights = init_weights(cfg, init)
    manifest = read_manifest(cfg.data, cfg.images)
    split, split_spec = study_split(cfg, manifest, init)
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

    job = Job(
        cfg=cfg,
        weights=weights,
        init=init,
        manifest=manifest,
        codes=np.array([classes.index(c) if c in classes else -1 for c in labels]),
        classes=classes,
        runtime=Runtime.of(cfg),
        run_dir=run_dir,
        options=checkpoint_options(cfg),
    )
    chosen = first_stage(job, train_rows=train_rows, val_rows=val_rows)
    model, refit = chosen.model, None
    if cfg.refit and chosen.best_epoch > 0:
        chosen.model = model = None  # the first stage's weights go: the refit starts afresh
        model, refit = refit_stage(job, rows=np.flatnonzero(split >= 0), epochs=chosen.best_epoch)
    shift_logits(model.head, chosen.offsets)
    decision = {"offsets": [float(v) for v in chosen.offsets], "classes": classes}
    if len(classes) == 2:
        decision["threshold"] = {classes[1]: threshold_of(chosen.offsets)}
    return write_run_folder(
        run_dir,
        Finished(
            cfg=cfg,
            manifest=manifest,
            model=model,
            backbone=chosen.backbone,
            classes=classes,
            init_head=init.head if init else None,
            split=split,
            split_spec=split_spec,
            precision=job.runtime.precision,
            history=chosen.history,
            best_epoch=chosen.best_epoch,
            failed=job.failed,
            started=started,
            refit=refit,
            validation=chosen.validation,
            decision=decision,
        ),
    )
