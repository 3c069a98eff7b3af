"""The whole pipeline on real data: extract -> fit (Optuna study) -> test, per backbone and head, with and
without test-time views and metadata. Prints grouped-CV and test balanced accuracy and AUC in one table.

EfficientNet-Lite0, Lite1 and Lite2 (the real ImageNet backbones available offline) on
../shared/data/ham10000_mel_nv_150 (2000 images, mel vs nv, 1563 lesions). Every backbone of a view set
is embedded into one feature store, so every fit uses the same lesion-grouped split (20 % test, 5 folds,
seed 0). First, without any study, each backbone's figure for a fixed head: a standardised logistic
regression (C=0.01, balanced classes), lesion-grouped 5-fold CV AUC over the study rows.

    python bench/accuracy.py [--backbones efficientnet_lite0,...] [--trials 20] [--heads linear,mlp,xgboost]
                             [--variants none:,d8:,...] [--work DIR]

`--heads ''` skips the studies (the fixed-head figures only). Stores are kept in --work (default
bench-work/) and reused on a rerun; runs are written there too.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classify.fit import FitConfig, fit, load_data  # noqa: E402
from classify.heads import LinearHead  # noqa: E402
from classify.inputs import InputSpec  # noqa: E402
from classify.metrics import evaluate  # noqa: E402
from features.splits import SplitSpec, split_for  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from extract.run import ExtractConfig, extract  # noqa: E402

sys.path.append(str(ROOT / "bench"))
from common import DATA, IN_MEMORY  # noqa: E402


LITE = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"


def untuned(path: Path, backbone: str, c: float) -> dict:
    """Standardised logistic regression with a fixed C and balanced class weights on the store's split:
    lesion-grouped 5-fold CV figures over the study rows (each fold predicted by a model fitted on the
    other four), and the test figures of a model fitted on all study rows."""
    store = FeatureStore(path)
    data = load_data(store, InputSpec((backbone,)), split_for(store, SplitSpec()), IN_MEMORY)
    classes = sorted(set(data.y))
    x, y, folds = data.x[data.study], data.y[data.study], data.folds[data.study]

    def head() -> LinearHead:
        return LinearHead(C=c, class_weight="balanced")

    cv = np.zeros((len(y), len(classes)))
    for k in range(folds.max() + 1):
        cv[folds == k] = head().fit(x[folds != k], y[folds != k]).predict_proba(x[folds == k])
    test = head().fit(x, y).predict_proba(data.x[data.test])
    g = data.groups
    return {
        "cv": evaluate(y, cv, classes, g[data.study], "mel", "nv"),
        "test": evaluate(data.y[data.test], test, classes, g[data.test], "mel", "nv"),
    }


def store_path(work: Path, tta: str) -> Path:
    """One store per view set, holding every backbone (one split for all of them)."""
    return work / f"ham-lite-{tta}.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=LITE, help="comma-separated backbone names (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--heads", default="linear,mlp,xgboost", help="comma-separated; empty: no studies")
    parser.add_argument(
        "--variants",
        default="none:,d8:,d8:age+sex+localization",
        help="comma-separated TTA:META pairs: extraction view set, and metadata columns joined by +",
    )
    parser.add_argument("--work", default=str(ROOT / "bench-work"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    began = time.monotonic()
    work = Path(args.work)
    backbones = [b for b in args.backbones.split(",") if b]
    heads = [h for h in args.heads.split(",") if h]
    variants = [v.split(":") for v in args.variants.split(",")]
    extracted = {}
    for tta in dict.fromkeys(["none", *(tta for tta, _ in variants)]):  # single view first: the fixed head's
        for backbone in backbones:
            started = time.monotonic()
            extract(
                ExtractConfig(
                    data=str(DATA / "labels.csv"),
                    images=str(DATA),
                    backbone=backbone,
                    out=str(store_path(work, tta)),
                    tta=tta,
                )
            )
            extracted[backbone, tta] = time.monotonic() - started
            print(
                f"extract {backbone} tta={tta}: {extracted[backbone, tta]:.0f} s (about 0 if already stored)",
                flush=True,
            )
    baselines = {(b, c): untuned(store_path(work, "none"), b, c) for b in backbones for c in (0.01, 1.0)}
    print()
    print("Fixed head: StandardScaler + LogisticRegression(C, class_weight='balanced'), single view; CV is")
    print("lesion-grouped 5-fold over the study rows")
    print()
    print(
        "| backbone | C | CV balanced accuracy | CV AUC | test balanced accuracy | test AUC "
        "| extraction (single view) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (b, c), m in baselines.items():
        print(
            f"| {b} | {c} | {m['cv']['balanced_accuracy']:.3f} | {m['cv']['auc']:.3f} | "
            f"{m['test']['balanced_accuracy']:.3f} | {m['test']['auc']:.3f} | {extracted[b, 'none']:.0f} s |",
            flush=True,
        )
    rows = []
    for tta, meta in variants:
        for backbone in backbones:
            for head in heads:
                started = time.monotonic()
                run = work / f"run-{backbone}-{head}-{tta}-{meta or 'nometa'}"
                shutil.rmtree(run, ignore_errors=True)  # a fresh study, so that the time is 20 trials' time
                metrics = fit(
                    FitConfig(
                        features=str(store_path(work, tta)),
                        head=head,
                        out=str(run),
                        backbone=backbone,
                        trials=args.trials,
                        meta=meta.replace("+", ","),
                    )
                )
                seconds = time.monotonic() - started
                rows.append((backbone, head, tta, meta, metrics, seconds))
                print(f"fit {backbone} {head} tta={tta} meta={meta or '-'}: {seconds:.0f} s", flush=True)
    if rows:
        print()
        print(
            "| backbone | head | inputs | CV balanced accuracy | CV AUC | test balanced accuracy | test AUC "
            f"| fit time ({args.trials} trials) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for backbone, head, tta, meta, m, seconds in rows:
        views = "single" if tta == "none" else f"{tta} (mean of views)"
        views += f" + {meta.replace('+', ', ')}" if meta else ""
        print(
            f"| {backbone} | {head} | {views} | {m['cv']['balanced_accuracy']:.3f} | {m['cv']['auc']:.3f} | "
            f"{m['test']['balanced_accuracy']:.3f} | {m['test']['auc']:.3f} | {seconds:.0f} s |"
        )
    print(f"\ntotal: {(time.monotonic() - began) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
