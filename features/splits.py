"""Lesion-grouped, stratified splits: a test part and K cross-validation folds, made once, stored.

`/splits/<name>` holds one int8 per row: the fold index (0..K-1) of a study row, `TEST` (-1) for the
test rows that no study ever sees, `UNUSED` (-2) for rows without a label. Every image of a lesion
(group) lands on the same side, so no lesion is both trained on and tested on. The name encodes the
recipe, so asking again for the same recipe reuses the stored split and never reshuffles test rows.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import dataclass

import h5py
import numpy as np
from filelock import FileLock
from sklearn.model_selection import StratifiedGroupKFold

from features.store import FeatureStore

TEST = -1
UNUSED = -2


@dataclass(frozen=True)
class SplitSpec:
    """How a split is made: the test fraction, the number of folds of the rest, the seed."""

    test_fraction: float = 0.2
    folds: int = 5
    seed: int = 0

    @property
    def name(self) -> str:
        return f"grouped-test{round(self.test_fraction * 100)}-k{self.folds}-seed{self.seed}"


class SplitError(ValueError):
    """A data set that cannot be split as asked (too few groups of a class, no labels)."""


def make_split(labels: np.ndarray, groups: np.ndarray, spec: SplitSpec) -> np.ndarray:
    """Assign each row a fold, TEST or UNUSED; raises SplitError naming a class with too few groups."""
    labels, groups = np.asarray(labels, dtype=object), np.asarray(groups, dtype=object)
    labelled = np.flatnonzero(labels != "")
    if len(labelled) == 0:
        raise SplitError("the store has no labels: nothing to train or test on")
    y, g = labels[labelled], groups[labelled]
    needed = spec.folds + 1
    per_class = {c: len(set(g[y == c])) for c in sorted(set(y))}
    if len(per_class) < 2:
        raise SplitError(f"only one class ({next(iter(per_class))!r}): a classifier needs at least two")
    short = {c: n for c, n in per_class.items() if n < needed}
    if short:
        listed = ", ".join(f"{c!r} has {n}" for c, n in short.items())
        raise SplitError(
            f"too few lesion groups: {listed}; a test part plus {spec.folds}-fold cross-validation needs "
            f"at least {needed} groups per class. Drop or merge those classes, or use fewer --folds."
        )
    split = np.full(len(labels), UNUSED, dtype=np.int8)
    outer = StratifiedGroupKFold(n_splits=max(2, round(1 / spec.test_fraction)), shuffle=True, random_state=spec.seed)
    rest, test = next(outer.split(labelled, y, g))
    split[labelled[test]] = TEST
    inner = StratifiedGroupKFold(n_splits=spec.folds, shuffle=True, random_state=spec.seed)
    for fold, (_, part) in enumerate(inner.split(rest, y[rest], g[rest])):
        split[labelled[rest[part]]] = fold
    assert not set(groups[split == TEST]) & set(groups[split >= 0]), "a lesion on both sides of the split"
    return split


def split_counts(split: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, int]]:
    """Rows per class in the study part and in the test part (for reports)."""
    labels = np.asarray(labels, dtype=object)
    return {
        "study": dict(sorted(Counter(labels[split >= 0]).items())),
        "test": dict(sorted(Counter(labels[split == TEST]).items())),
    }


def read_split(store: FeatureStore, name: str) -> np.ndarray | None:
    """The stored split, with rows added to the store after it was made marked UNUSED."""
    with h5py.File(store.path, "r") as f:
        if f"splits/{name}" not in f:
            return None
        stored = f[f"splits/{name}"][()]
        n = len(f["samples/image_id"])
    if len(stored) < n:
        return np.concatenate([stored, np.full(n - len(stored), UNUSED, dtype=np.int8)])
    return stored


def ensure_split(store: FeatureStore, spec: SplitSpec) -> np.ndarray:
    """The split of `spec` from the store, made and stored (atomically) the first time.

    A lock next to the store makes concurrent `fit` workers agree: the first writes, the others read.
    """
    existing = read_split(store, spec.name)
    if existing is not None:
        return existing
    with FileLock(str(store.path.with_name(f".{store.path.name}.lock"))):
        existing = read_split(store, spec.name)
        if existing is not None:
            return existing
        samples = store.samples()
        split = make_split(np.array(samples.label, dtype=object), np.array(samples.group, dtype=object), spec)
        tmp = store.path.with_name(f"{store.path.name}.{os.getpid()}.tmp")
        shutil.copyfile(store.path, tmp)
        try:
            with h5py.File(tmp, "r+") as f:
                ds = f.require_group("splits").create_dataset(spec.name, data=split)
                ds.attrs.update(
                    {
                        "seed": spec.seed,
                        "method": "StratifiedGroupKFold",
                        "folds": spec.folds,
                        "test_fraction": spec.test_fraction,
                    }
                )
            os.replace(tmp, store.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return split
