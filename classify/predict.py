"""Using a run: `evaluate` scores it on its test rows or on another labelled store (external
validation), `predict` embeds new images exactly as the run's store was embedded and classifies them.

Embeddings from other settings are not comparable, so both check the backbones' fingerprints (weights,
preprocessing, precision, views) against the ones the run was trained on before scoring anything.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classify.inputs import store_meta
from classify.isic import challenge_csv, challenge_for
from classify.metrics import evaluate
from classify.subgroups import subgroup_figures
from features.duplicates import DEFAULT_THRESHOLD
from classify.runs import (
    Run,
    RunError,
    RunSplit,
    load_run,
    predictions_csv,
    recorded_options,
    run_split,
    weights_option,
    write_json,
    write_text,
)
from features.splits import TEST, lesions_in_test, small_test
from features.rows import MEMORY_BUDGET, StoreRows, embedded_rows, load_inputs, parse_budget, read_embeddings
from features.store import FeatureStore, StoreError, describe_mismatch

__all__ = [
    "Prediction",
    "check_fingerprints",
    "evaluate_run",
    "new_folder",
    "parse_label_map",
    "predict",
    "seen_rows",
]

log = logging.getLogger("classify")


def check_fingerprints(run: Run, store: FeatureStore) -> None:
    """The store's embeddings must come from the run's backbones with the run's exact settings."""
    for backbone, expected in run.card["extraction"].items():
        if backbone not in store.backbones:
            raise StoreError(
                f"{store.path} has no {backbone} embeddings (it has: {', '.join(store.backbones) or 'none'}); "
                f"extract them with the run's settings first"
            )
        attrs = store.backbone_attrs(backbone)
        if attrs["fingerprint"] != expected["fingerprint"]:
            differ = describe_mismatch(expected["identity"], attrs.get("identity"), names=("run", "store"))
            raise RunError(
                f"{store.path}: its {backbone} embeddings were made with other settings than the run's "
                f"({differ}); they are not comparable"
            )


def _meta(store: FeatureStore, run: Run) -> dict[str, np.ndarray]:
    """The run's metadata columns from the store; columns it lacks count as blank (with a warning)."""
    have = store.meta_columns()
    missing = [c for c in run.inputs.meta if c not in have]
    if missing:
        log.warning("%s lacks metadata %s: treated as missing for every row", store.path, ", ".join(missing))
    return {c: store.column(f"meta/{c}").astype(object) for c in run.inputs.meta if c in have}


def _inputs(store: FeatureStore, run: Run, rows: np.ndarray, budget: int) -> np.ndarray | StoreRows:
    """The run's inputs for `rows` (a mask), in memory or streamed as the budget allows."""
    meta = run.encoder.transform(_meta(store, run), len(store))
    return load_inputs(store, run.inputs.backbones, rows, meta, budget, all_views=run.inputs.all_views)


def parse_label_map(text: str) -> dict[str, str]:
    """`melanoma=mel,nevus=nv` -> {"melanoma": "mel", "nevus": "nv"}."""
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 for p in pairs):
        raise RunError(f"--label-map {text!r}: write it as store_label=run_label,...")
    return {a.strip(): b.strip() for a, b in pairs}


def seen_rows(split: RunSplit, ids: np.ndarray, sha256: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a store (by `ids`, `sha256`) that the run trained or was tuned on: the same image id, or
    the same file under another id (same SHA-256). Both as masks, by reason."""
    seen = split.seen
    by_id = np.isin(ids, split.image_id[seen])
    hashes = [h for h in split.sha256[seen] if h]
    by_file = np.isin(sha256, hashes) & (sha256 != "") & ~by_id
    return {
        "trained or tuned on (same image id)": by_id,
        "the same file as an image trained or tuned on (same SHA-256)": by_file,
    }


def evaluate_run(
    run_dir: str | Path,
    features: str | None = None,
    label_map: str = "",
    memory_budget: str = MEMORY_BUDGET,
    subgroups: str = "",
    *,
    fmt: str = "csv",
    near_duplicates: float = DEFAULT_THRESHOLD,
) -> dict:
    """Metrics of a run on its own test rows, or on every labelled row of another store that the run has
    not seen (an image it trained or was tuned on, by id or by file content, is never scored as new);
    embeddings larger than `memory_budget` are read and scored block by block."""
    run = load_run(run_dir)
    challenge = challenge_for(fmt, run.classes)  # classes that do not map: refused before any work
    own = features is None
    store = FeatureStore(features or run.card["store"])
    check_fingerprints(run, store)
    columns = tuple(c.strip() for c in subgroups.split(",") if c.strip())
    meta = store_meta(store, columns)  # a column the store lacks: refused before anything is scored
    rows = embedded_rows(store, run.inputs.backbones)
    mapping = parse_label_map(label_map)
    labels = np.array([mapping.get(v, v) for v in store.column("label")], dtype=object)
    rows &= labels != ""
    split = run_split(run)
    ids = store.column("image_id")
    if own:
        rows &= np.isin(ids, split.test_ids)
    excluded = {}
    for reason, mask in seen_rows(split, ids, store.column("sha256")).items():
        if np.any(rows & mask):
            excluded[reason] = int(np.sum(rows & mask))
            rows &= ~mask
    if excluded:
        log.warning(
            "%s: %d images left out, as the run has seen them: %s",
            store.path,
            sum(excluded.values()),
            "; ".join(f"{n} {reason}" for reason, n in excluded.items()),
        )
    unknown = sorted(set(labels[rows]) - set(run.classes))
    if unknown:
        raise RunError(
            f"{store.path}: labels {', '.join(unknown)} are not classes of the run ({', '.join(run.classes)}); "
            f"map them with --label-map store_label=run_label,..."
        )
    if not rows.any():
        why = (
            (
                f": all {sum(excluded.values())} labelled images were trained or tuned on by the run (same id or "
                "same file), so none is unseen"
            )
            if excluded
            else ""
        )
        raise RunError(f"{store.path}: no labelled rows to evaluate on{why}")
    near = np.zeros(len(ids), dtype=bool)
    if not own and near_duplicates:
        near = rows & (near_training(run, store, rows) >= near_duplicates)
        if near.all() or not (rows & ~near).any():
            raise RunError(
                f"{store.path}: every unseen labelled image is a near-duplicate (cosine >= {near_duplicates:g}) of "
                "an image the run trained on; nothing external is left to score"
            )
    apart = _near_duplicate_figures(run, store, near, labels, near_duplicates, memory_budget) if near.any() else None
    rows &= ~near
    proba = run.proba(_inputs(store, run, rows, parse_budget(memory_budget)))
    groups = store.column("group")[rows]
    point = run.operating_point
    metrics = evaluate(
        labels[rows],
        proba,
        run.classes,
        groups,
        run.card.get("positive"),
        run.card["majority"],
        threshold=point.threshold if point else None,
        rule=point.rule if point else None,
    )
    if columns:
        metrics["subgroups"] = subgroup_figures(
            {c: v[rows] for c, v in meta.items()},
            labels[rows],
            proba,
            run.classes,
            groups,
            positive=run.card.get("positive"),
            threshold=point.threshold if point else None,
        )
    warning = small_test(lesions_in_test(labels[rows], groups, np.full(len(groups), TEST)))
    if warning:
        metrics["warning"] = warning.replace("the test part", "the scored set")
    metrics["excluded"] = excluded
    if apart is not None:
        metrics["near_duplicates"] = apart
    folder = new_folder(run.folder / "evaluations", "test" if own else Path(store.path).stem)
    metrics["folder"] = str(folder)
    write_json(
        folder / "metrics.json",
        {"store": str(store.path.resolve()), "rows": "test" if own else "all labelled, unseen", **metrics},
    )
    decisions = run.decide(proba)
    write_text(folder / "predictions.csv", predictions_csv(ids[rows], proba, run.classes, decisions))
    if challenge is not None:  # the scorer's own columns, beside the toolkit's CSV
        write_text(folder / "predictions.isic.csv", challenge_csv(challenge, ids[rows], proba, run.classes))
    from classify.report import write_evaluation_report  # matplotlib only when a report is written

    run_test = json.loads((run.folder / "metrics.json").read_text())["test"]
    where = "its own test rows" if own else f"{store.path} (every labelled image the run has not seen)"
    write_evaluation_report(
        folder,
        metrics=metrics,
        run_test=run_test,
        title=f"{run.folder} on {where}",
        labels=labels[rows],
        proba=proba,
    )
    from classify.html import write_html_report
    from classify.visuals import gallery_section

    gallery = gallery_section(
        run.folder,
        ids=ids[rows],
        files=store.image_files()[rows],
        labels=labels[rows],
        proba=proba,
        classes=run.classes,
        decisions=decisions,
        positive=run.card.get("positive"),
    )
    write_html_report(folder, [gallery])
    return metrics


def near_training(run: Run, store: FeatureStore, rows: np.ndarray) -> np.ndarray:
    """Per store row (0 outside `rows`), the highest cosine similarity of its embedding (the run's first
    backbone's) to any image the run trained or was tuned on, read from the run's own store; all 0, with
    a warning, when that store is not here."""
    from features.duplicates import BLOCK_ROWS, nearest_similarity, store_blocks

    best = np.zeros(len(rows))
    path = Path(run.card["store"])
    if not path.is_file():
        log.warning("%s: the run's store is not here; near-duplicates of its training images are not checked", path)
        return best
    own = FeatureStore(path)
    backbone = run.inputs.backbones[0]
    split = run_split(run)
    trained = np.flatnonzero(np.isin(own.column("image_id"), split.image_id[split.seen]) & own.done(backbone))
    queries = np.flatnonzero(rows)
    best[queries] = nearest_similarity(
        store_blocks(store, backbone, queries, BLOCK_ROWS), store_blocks(own, backbone, trained, BLOCK_ROWS)
    )
    return best


def _near_duplicate_figures(
    run: Run, store: FeatureStore, near: np.ndarray, labels: np.ndarray, threshold: float, budget: str
) -> dict:
    """The external images that are near-duplicates of training images, scored apart: how many, and
    their figures where both classes are among them."""
    figures: dict = {"threshold": threshold, "images": int(near.sum()), "ids": store.column("image_id")[near].tolist()}
    y = labels[near]
    if len(set(y)) >= 2:
        proba = run.proba(_inputs(store, run, near, parse_budget(budget)))
        m = evaluate(y, proba, run.classes, store.column("group")[near], run.card.get("positive"), run.card["majority"])
        figures.update({k: m[k] for k in ("n", "lesions", "balanced_accuracy", "auc", "ci95")})
    return figures


def new_folder(parent: Path, name: str) -> Path:
    """A folder under `parent` that no earlier evaluation used: `name`, else `name-2`, `name-3`, ..."""
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        folder = parent / (name if k == 1 else f"{name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RunError(f"{parent}: no free folder name for {name}; move earlier evaluations away")


@dataclass
class Prediction:
    ids: list[str]
    proba: np.ndarray
    """Calibrated as the run was."""
    classes: list[str]
    failed: dict[str, str]
    """Inputs that could not be classified (image id, or a folder with no images) and why."""
    decisions: np.ndarray
    """Each image's decided class: at the run's operating point where it has one, else the argmax."""
    ood_score: np.ndarray
    """Each image's out-of-distribution score (classify/ood.py; NaN where the run has no description)."""
    in_distribution: np.ndarray
    """Whether the score is within the run's threshold (True everywhere for a run without a description:
    nothing can be flagged)."""
    has_ood: bool = False
    """Whether the run has an out-of-distribution description (the two fields above mean something)."""


def predict(
    run_dir: str | Path,
    paths: list[str],
    batch_size: int = 0,
    workers: int = -1,
    device: str = "auto",
    root: str | None = None,
) -> Prediction:
    """Class probabilities of new images, embedded exactly as the run's training store was; every input
    that could not be classified is in `failed` with its reason."""
    from extract.manifest import read_paths
    from extract.run import ExtractConfig, extract

    run = load_run(run_dir)
    manifest, failed = read_paths(paths, root)
    if not len(manifest):
        none = np.zeros(0)
        empty = np.array([], dtype=object)
        return Prediction([], np.zeros((0, len(run.classes))), run.classes, failed, empty, none, none.astype(bool))
    with tempfile.TemporaryDirectory(prefix="predict-") as tmp:
        store_path = Path(tmp) / "predict.h5"
        for backbone, recorded in run.card["extraction"].items():  # one pass each: settings may differ
            options = recorded_options(recorded)
            extract(
                ExtractConfig(
                    backbone=backbone,
                    weights=weights_option(backbone, recorded, run.folder),
                    pool=options.pool,
                    input_size=options.input_size,
                    clip_embed=options.clip_embed,
                    out=str(store_path),
                    precision=recorded["precision"],
                    tta=recorded["views"],
                    runtime=recorded.get("runtime", "torch"),
                    decode=recorded.get("decode") or "pil",  # runs from before --decode: Pillow
                    calibration=recorded.get("calibration") or "",
                    batch_size=batch_size,
                    workers=workers,
                    device=device,
                    max_failed=1.0,  # predict reports every failure itself
                ),
                manifest=manifest,
            )
        store = FeatureStore(store_path)
        check_fingerprints(run, store)
        rows = embedded_rows(store, run.inputs.backbones)
        ids = [i for i, ok in zip(store.column("image_id"), rows) if ok]
        proba = run.proba(_inputs(store, run, rows, parse_budget(MEMORY_BUDGET))) if ids else None
        ood = run.ood
        scores = np.full(len(ids), np.nan)
        if ood is not None and ids:
            scores = ood.score(read_embeddings(store, run.inputs.backbones, all_views=False)[rows])
        failed.update(store.failed())
    proba = proba if proba is not None else np.zeros((0, len(run.classes)))
    inside = ood.in_distribution(scores) if ood is not None else np.ones(len(ids), dtype=bool)
    return Prediction(ids, proba, run.classes, failed, run.decide(proba), scores, inside, ood is not None)
