"""The run folder of a fine-tuning, written in one place (`write_run_folder`): the same files as a
`fit` run's, so that `predict`, `evaluate` and the report read both alike."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from classify.finetune.checkpoint import atomic_save
from classify.finetune.config import BACKBONE_FILE, STORE, VALIDATION_FOLD, FinetuneConfig
from classify.finetune.model import Model, head_file
from classify.heads import Head
from classify.inputs import InputSpec, proba_views
from classify.metrics import default_positive, evaluate
from classify.report import training_parts
from classify.runs import RunRecord, extraction_record, write_run
from extract.manifest import Manifest
from extract.run import ExtractConfig, extract
from features.splits import TEST, UNUSED, SplitSpec, lesions_in_test, small_test, split_counts
from features.store import FeatureStore

__all__ = ["Finished", "write_run_folder"]


@dataclass
class Finished:
    """What the stages leave for the run folder."""

    cfg: FinetuneConfig
    """The options, with the head's learning rate resolved."""
    manifest: Manifest
    model: Model
    """The final model (the refit's when there was one), its decision offsets already in the head."""
    backbone: str
    classes: list[str]
    init_head: Head | None
    """--init's head (an MLP's parameters are copied from it), or None."""
    split: np.ndarray
    """Fold of each manifest row (TEST, UNUSED, or a study fold)."""
    split_spec: SplitSpec
    precision: str
    history: list[dict]
    """The first stage's epochs: loss, validation balanced accuracy and AUC, images/s."""
    best_epoch: int
    failed: dict[str, str]
    """Image id -> reason, for every image that could not be used; extraction's failures are added."""
    started: float
    """`time.monotonic()` when the command started."""
    refit: dict | None
    """The refit's epochs, rows and losses, or None when there was none."""
    validation: tuple[np.ndarray, np.ndarray]
    """(manifest rows, probabilities with the decision offsets) of the chosen epoch's validation images."""
    decision: dict
    """The decision rule chosen on validation: offsets per class (and the threshold of two classes)."""


def write_run_folder(run_dir: Path, finished: Finished) -> dict:
    """Save the fine-tuned backbone and head, embed the data set with them (the run's store), score the
    test rows from that store; report the chosen epoch's validation predictions (made before any refit,
    with the decision rule set on them), and write the run folder through `runs.write_run`, as `fit`
    does: backbone.pt and embeddings.h5 here, then split.npz, the head and run.json, config.json,
    history.json, metrics.json, the prediction CSVs, failed.csv (when images failed) and report.md.
    Returns the metrics."""
    fin, cfg, backbone, classes, split = finished, finished.cfg, finished.backbone, finished.classes, finished.split
    model = fin.model.cpu().eval()
    atomic_save(model.backbone.state_dict(), run_dir / BACKBONE_FILE)
    head = head_file(model.head, classes, fin.init_head)
    store_path = run_dir / STORE
    if store_path.exists():
        store_path.unlink()  # a rerun after a crash in this step starts the store afresh
    summary = extract(
        ExtractConfig(
            backbone=backbone,
            weights=str(run_dir / BACKBONE_FILE),
            pool=cfg.pool,
            input_size=cfg.input_size,
            clip_embed=cfg.clip_embed,
            out=str(store_path),
            precision=fin.precision,
            tta=cfg.tta,
            decode="pil",  # the pictures the backbone was fine-tuned on (classify/finetune/data.py)
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            device=cfg.device,
        ),
        manifest=fin.manifest,
    )
    fin.failed.update(summary.failed)
    store = FeatureStore(store_path)
    ids = np.array(store.samples().image_id, dtype=object)
    labels = np.array(store.samples().label, dtype=object)
    groups = np.array(store.samples().group, dtype=object)
    x = store.embeddings(backbone)
    done = store.done(backbone)
    positive = cfg.positive or default_positive(classes)
    majority = max(classes, key=lambda c: (np.sum(labels[split >= 0] == c), c))
    metrics, proba_of = {}, {}
    for part, rows in (("test", (split == TEST) & done), ("validation", (split == VALIDATION_FOLD) & done)):
        if part == "validation":
            kept, proba = fin.validation
            row_of = {image_id: row for row, image_id in enumerate(ids)}
            rows = np.array([row_of[fin.manifest.image_id[r]] for r in kept], dtype=np.int64)
        else:
            proba = proba_views(head, x[rows])
        proba_of[part] = (ids[rows], labels[rows], proba)
        metrics[part] = evaluate(labels[rows], proba, classes, groups[rows], positive, majority, seed=cfg.seed)
    warning = small_test(lesions_in_test(labels, groups, split))
    if warning:
        metrics["warning"] = metrics["test"]["warning"] = metrics["validation"]["warning"] = warning
    config = {
        **dataclasses.asdict(cfg),
        "kind": "finetune",
        "head": head.name,
        "backbone": backbone,
        "features": str(store_path),
        "views": "mean" if cfg.tta == "none" else f"mean of {cfg.tta} views",
        "meta": "",
        "split": fin.split_spec.name,
        "precision": fin.precision,
        "best_epoch": fin.best_epoch,
        "chosen_by": "validation AUC",
        "decision": fin.decision,
        "refit": fin.refit,
        "params": {
            k: cfg.__dict__[k] for k in ("unfreeze", "lr", "backbone_lr", "weight_decay", "epochs", "batch_size")
        },
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        "seconds": round(time.monotonic() - fin.started, 1),
    }
    write_run(
        run_dir,
        RunRecord(
            head=head,
            store=store_path,
            split=fin.split_spec.name,
            ids=ids,
            folds=np.where(done, split, UNUSED),
            sha256=store.column("sha256"),
            inputs=InputSpec((backbone,)),
            meta_encoder={},
            extraction=extraction_record(store, [backbone]),
            positive=positive,
            majority=majority,
            config=config,
            metrics=metrics,
            predictions={part: (part_ids, proba) for part, (part_ids, _, proba) in proba_of.items()},
            test_labels=proba_of["test"][1],
            counts=split_counts(split, labels),
            report=training_parts(config, fin.history),
            card_extra={
                "kind": "finetune",
                "init": str(Path(cfg.init).resolve()) if cfg.init else None,
                "unfreeze": cfg.unfreeze,
                "best_epoch": fin.best_epoch,
                "decision": fin.decision,
            },
            extra_files={"history.json": fin.history},
            failed=fin.failed,
        ),
    )
    return metrics
