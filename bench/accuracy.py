"""The whole pipeline on real data: extract -> fit (Optuna study) -> test, per head, with and without
test-time views and metadata. Prints grouped-CV and test balanced accuracy and AUC in one table.

EfficientNet-Lite0 (the one real ImageNet backbone available offline) on
../shared/data/ham10000_mel_nv_150 (2000 images, mel vs nv, 1563 lesions). Every fit uses the same
lesion-grouped split stored in its feature store (20 % test, 5 folds, seed 0).

    python bench/accuracy.py [--trials 20] [--heads linear,mlp,xgboost] [--work DIR]

Stores are kept in --work (default bench-work/) and reused on a rerun; runs are written there too.
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


def untuned(path: Path, c: float) -> tuple[float, dict]:
    """Logistic regression with a fixed C on the same split: grouped-CV and test figures."""
    store = FeatureStore(path)
    data = load_data(store, InputSpec(("efficientnet_lite0",)), split_for(store, SplitSpec()), IN_MEMORY)
    classes = sorted(set(data.y))
    x, y, folds = data.x[data.study], data.y[data.study], data.folds[data.study]
    cv = np.zeros((len(y), len(classes)))
    for k in range(folds.max() + 1):
        cv[folds == k] = LinearHead(C=c).fit(x[folds != k], y[folds != k]).predict_proba(x[folds == k])
    test = LinearHead(C=c).fit(x, y).predict_proba(data.x[data.test])
    g = data.groups
    return c, {
        "cv": evaluate(y, cv, classes, g[data.study], "mel", "nv"),
        "test": evaluate(data.y[data.test], test, classes, g[data.test], "mel", "nv"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--heads", default="linear,mlp,xgboost")
    parser.add_argument(
        "--variants",
        default="none:,d8:,d8:age+sex+localization",
        help="comma-separated TTA:META pairs: extraction view set, and metadata columns joined by +",
    )
    parser.add_argument("--work", default=str(ROOT / "bench-work"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    rows = []
    for variant in args.variants.split(","):
        tta, meta = variant.split(":")
        store = work / f"ham-lite0-{tta}.h5"
        started = time.monotonic()
        extract(
            ExtractConfig(
                data=str(DATA / "labels.csv"), images=str(DATA), backbone="efficientnet_lite0", out=str(store), tta=tta
            )
        )
        seconds = time.monotonic() - started
        print(f"extract tta={tta}: {seconds:.0f} s (about 0 if the store was already complete)", flush=True)
        for head in args.heads.split(","):
            started = time.monotonic()
            run = work / f"run-{head}-{tta}-{meta or 'nometa'}"
            shutil.rmtree(run, ignore_errors=True)  # a fresh study, so that the time is 20 trials' time
            metrics = fit(
                FitConfig(features=str(store), head=head, out=str(run), trials=args.trials, meta=meta.replace("+", ","))
            )
            seconds = time.monotonic() - started
            rows.append((head, tta, meta, metrics, seconds))
            print(f"fit {head} tta={tta} meta={meta or '-'}: {seconds:.0f} s", flush=True)
    baselines = [untuned(work / "ham-lite0-none.h5", c) for c in (0.01, 1.0)]
    print()
    print(
        "| head | inputs | CV balanced accuracy | CV AUC | test balanced accuracy | test AUC "
        f"| fit time ({args.trials} trials) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for c, m in baselines:
        print(
            f"| linear, untuned C={c} | single | {m['cv']['balanced_accuracy']:.3f} | {m['cv']['auc']:.3f} | "
            f"{m['test']['balanced_accuracy']:.3f} | {m['test']['auc']:.3f} | no study |"
        )
    for head, tta, meta, m, seconds in rows:
        views = "single" if tta == "none" else f"{tta} (mean of views)"
        views += f" + {meta.replace('+', ', ')}" if meta else ""
        print(
            f"| {head} | {views} | {m['cv']['balanced_accuracy']:.3f} | {m['cv']['auc']:.3f} | "
            f"{m['test']['balanced_accuracy']:.3f} | {m['test']['auc']:.3f} | {seconds:.0f} s |"
        )


if __name__ == "__main__":
    main()
