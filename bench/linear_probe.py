"""Linear-probe check of a feature store: is it the real pretrained network, preprocessed right?

Standardised logistic regression (C=0.01, balanced class weights) on one backbone's embeddings,
scored by lesion-grouped stratified 5-fold cross-validation (AUC for two classes, macro one-vs-rest
otherwise). With correctly preprocessed EfficientNet-Lite0 embeddings of ham10000_mel_nv_150 it gives
about 0.87; random weights or wrong normalisation fall well below.

    python bench/linear_probe.py STORE.h5 [--backbone NAME] [STORE2.h5 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from features.store import FeatureStore  # noqa: E402


def probe_auc(store: FeatureStore, backbone: str, seed: int = 0) -> float:
    samples = store.samples()
    x = store.embeddings(backbone)
    keep = store.done(backbone) & (np.array(samples.label) != "")
    x, y, groups = x[keep], np.array(samples.label)[keep], np.array(samples.group)[keep]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, class_weight="balanced", max_iter=2000))
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed)
    proba = cross_val_predict(model, x, y, groups=groups, cv=folds, method="predict_proba")
    classes = np.unique(y)
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+")
    parser.add_argument("--backbone", default=None, help="default: every backbone in the store")
    args = parser.parse_args()
    print(f"{'store':<40} {'backbone':<20} {'precision':<9} {'rows':>5} {'grouped 5-fold AUC':>18}")
    for path in args.stores:
        store = FeatureStore(path)
        for backbone in [args.backbone] if args.backbone else store.backbones:
            attrs = store.backbone_attrs(backbone)
            auc = probe_auc(store, backbone)
            print(
                f"{path:<40} {backbone:<20} {attrs['precision']:<9} {int(store.done(backbone).sum()):>5} {auc:>18.4f}"
            )


if __name__ == "__main__":
    main()
