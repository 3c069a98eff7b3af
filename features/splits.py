"""Lesion-grouped, stratified splits: a test part and K cross-validation folds, made once, stored.

`/splits/<name>` holds one int8 per row: the fold index (0..K-1) of a study row, `TEST` (-1) for the
test rows that no study ever sees, `UNUSED` (-2) for rows without a label. Every image of a lesion
(group) lands on the same side, so no lesion is both trained on and tested on. The name encodes the
recipe, so asking again for the same recipe reuses the stored split and never reshuffles test rows.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass

import h5py
import numpy as np
from filelock import FileLock

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
    """Assign each row a fold, TEST or UNUSED; raises SplitError naming a class with too few groups.

    Lesion groups are dealt out per class (a group counts for its most frequent label): a seeded
    shuffle, then round(test_fraction x groups) of them to the test part (at least one, and never so
    many that fewer than K remain), then the rest one by one to the fold holding the fewest images of
    that class. So the test part holds the asked share of each class's lesions and every fold holds
    every class.
    """
    labels, groups = np.asarray(labels, dtype=object), np.asarray(groups, dtype=object)
    labelled = labels != ""
    if not labelled.any():
        raise SplitError("the store has no labels: nothing to train or test on")
    members: dict[str, list[int]] = {}
    for row in np.flatnonzero(labelled):
        members.setdefault(groups[row], []).append(row)
    by_class: dict[str, list[str]] = {}
    for group, rows in members.items():
        label = Counter(labels[rows]).most_common(1)[0][0]
        by_class.setdefault(label, []).append(group)
    if len(by_class) < 2:
        raise SplitError(f"only one class ({next(iter(by_class))!r}): a classifier needs at least two")
    needed = spec.folds + 1
    short = {c: len(g) for c, g in sorted(by_class.items()) if len(g) < needed}
    if short:
        listed = ", ".join(f"{c!r} has {n}" for c, n in short.items())
        raise SplitError(
            f"too few lesion groups: {listed}; a test part plus {spec.folds}-fold cross-validation needs "
            f"at least {needed} groups per class. Drop or merge those classes, or use fewer --folds."
        )
    rng = np.random.default_rng(spec.seed)
    split = np.full(len(labels), UNUSED, dtype=np.int8)
    fold_images = np.zeros(spec.folds, dtype=int)
    for label in sorted(by_class):
        shuffled = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        n_test = min(max(1, round(spec.test_fraction * len(shuffled))), len(shuffled) - spec.folds)
        for group in shuffled[:n_test]:
            split[members[group]] = TEST
        in_class = np.zeros(spec.folds, dtype=int)
        for group in sorted(shuffled[n_test:], key=lambda g: -len(members[g])):  # big groups first
            fold = min(range(spec.folds), key=lambda k: (in_class[k], fold_images[k], k))
            split[members[group]] = fold
            in_class[fold] += len(members[group])
            fold_images[fold] += len(members[group])
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
        split = make_split(store.column("label"), store.column("group"), spec)
        write_split(store, spec, split)
    return split


def write_split(store: FeatureStore, spec: SplitSpec, split: np.ndarray) -> None:
    """Add /splits/<spec.name> to the store: a copy with the split, renamed over the store."""
    tmp = store.path.with_name(f"{store.path.name}.{os.getpid()}.tmp")
    shutil.copyfile(store.path, tmp)
    try:
        with h5py.File(tmp, "r+") as f:
            ds = f.require_group("splits").create_dataset(spec.name, data=np.asarray(split, dtype=np.int8))
            ds.attrs.update(
                {
                    "seed": spec.seed,
                    "method": "grouped-stratified-deal",
                    "folds": spec.folds,
                    "test_fraction": spec.test_fraction,
                }
            )
        os.replace(tmp, store.path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def spec_from_name(name: str) -> SplitSpec:
    """The recipe back from a split's name (`grouped-test20-k5-seed0`)."""
    match = re.fullmatch(r"grouped-test(\d+)-k(\d+)-seed(-?\d+)", name)
    if not match:
        raise ValueError(f"not a split name: {name!r}")
    return SplitSpec(int(match.group(1)) / 100, int(match.group(2)), int(match.group(3)))
