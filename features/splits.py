"""Lesion-grouped, stratified splits: a test part and K cross-validation folds.

A split is one int8 per store row: the fold index (0..K-1) of a study row, `TEST` (-1) for the test
rows that no study ever sees, `UNUSED` (-2) for rows that cannot be fitted (no label, or an image that
was not embedded). Every image of a lesion (group) lands on the same side, so no lesion is both
trained on and tested on.

A split is a pure function of the recipe (`SplitSpec`, whose name encodes it) and of the store's usable
rows, so it is made again wherever it is needed instead of being written into the store: `fit` never
writes into its input (a store on a read-only medium works, and trying recipes leaves nothing behind),
and every head and backbone fitted on the same store and recipe gets the same test rows. A run keeps
the split it used (classify/runs.py), so it is scored on the same rows even after the store grows.
Stores written by earlier versions hold splits under `/splits/<name>`; those are read as they are.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import h5py
import numpy as np

from features.store import FeatureStore

__all__ = [
    "MIN_TEST_LESIONS",
    "SplitError",
    "SplitSpec",
    "TEST",
    "UNUSED",
    "left_out",
    "lesions_in_test",
    "make_split",
    "merged_groups",
    "read_split",
    "small_test",
    "spec_from_name",
    "split_counts",
    "split_digest",
    "split_for",
    "study_subset",
    "usable_rows",
]

TEST = -1
UNUSED = -2
MIN_TEST_LESIONS = 10
"""A class with fewer lesions than this in the test part makes its figures too uncertain to mean much:
`fit` refuses it unless told to go on, and then marks every figure."""


@dataclass(frozen=True)
class SplitSpec:
    """How a split is made: the test fraction, the number of folds of the rest, the seed."""

    test_fraction: float = 0.2
    folds: int = 5
    seed: int = 0
    duplicates: float = 0.0
    """Cosine threshold of near-duplicates whose lesion groups are merged before the split is dealt out
    (`fit --group-duplicates`; 0: off), so that a re-cropped or re-compressed copy filed under another
    lesion id can never sit on the other side."""
    duplicates_backbone: str = ""
    """Whose embeddings judge the near-duplicates."""

    @property
    def name(self) -> str:
        name = f"grouped-test{round(self.test_fraction * 100)}-k{self.folds}-seed{self.seed}"
        return name + (f"-dup{self.duplicates:g}-{self.duplicates_backbone}" if self.duplicates else "")


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


def study_subset(folds: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The study rows (fold >= 0) of a share `fraction` of the study lesions: the rows of a label-efficiency
    run (`fit --fractions`). Whole lesion groups are taken, per class and per fold (a group counts for its
    most frequent label), so every fold keeps every class (at least one group each) and the folds keep
    their sizes in proportion. The groups of each class and fold are ordered once by a permutation of
    `seed` that does not depend on `fraction`, and a subset is the first round(fraction x n) of them: the
    subsets of one seed are nested, so a curve over fractions adds data rather than redrawing it."""
    folds = np.asarray(folds)
    labels, groups = np.asarray(labels, dtype=object), np.asarray(groups, dtype=object)
    study = folds >= 0
    if fraction >= 1:
        return study
    members: dict[str, list[int]] = {}
    for row in np.flatnonzero(study):
        members.setdefault(groups[row], []).append(row)
    cells: dict[tuple[str, int], list[str]] = {}
    for group, rows in members.items():
        label = Counter(labels[rows]).most_common(1)[0][0]
        cells.setdefault((label, int(folds[rows[0]])), []).append(group)
    rng = np.random.default_rng(seed)
    keep = np.zeros(len(folds), dtype=bool)
    for cell in sorted(cells):
        ordered = sorted(cells[cell])
        ordered = [ordered[i] for i in rng.permutation(len(ordered))]
        for group in ordered[: max(1, round(fraction * len(ordered)))]:
            keep[members[group]] = True
    return keep


def split_counts(split: np.ndarray, labels: np.ndarray) -> dict[str, dict[str, int]]:
    """Rows per class in the study part and in the test part (for reports)."""
    labels = np.asarray(labels, dtype=object)
    return {
        "study": dict(sorted(Counter(labels[split >= 0]).items())),
        "test": dict(sorted(Counter(labels[split == TEST]).items())),
    }


def read_split(store: FeatureStore, name: str) -> np.ndarray | None:
    """A split stored in the store by an earlier version (`/splits/<name>`), with rows added to the store
    after it was made marked UNUSED; None when there is none."""
    with h5py.File(store.path, "r") as f:
        if f"splits/{name}" not in f:
            return None
        stored = f[f"splits/{name}"][()]
        n = len(f["samples/image_id"])
    if len(stored) < n:
        return np.concatenate([stored, np.full(n - len(stored), UNUSED, dtype=np.int8)])
    return stored


def usable_rows(store: FeatureStore) -> np.ndarray:
    """Rows a split deals out: labelled, and embedded (by any backbone: an image that could not be read
    has no embedding at all). Not tied to one backbone, so that every backbone of the store gets the
    same split."""
    embedded = np.zeros(len(store), dtype=bool)
    for backbone in store.backbones:
        embedded |= store.done(backbone)
    failed = store.failed()
    if failed:
        embedded &= ~np.isin(store.column("image_id"), list(failed))
    return embedded & (store.column("label") != "")


def left_out(store: FeatureStore) -> dict[str, int]:
    """Labelled rows that no split uses, by reason (for reports)."""
    labelled = store.column("label") != ""
    unusable = labelled & ~usable_rows(store)
    if not unusable.any():
        return {}
    failed = np.isin(store.column("image_id"), list(store.failed()))
    reasons = {
        "image could not be read": int(np.sum(unusable & failed)),
        "not embedded": int(np.sum(unusable & ~failed)),
    }
    return {reason: n for reason, n in reasons.items() if n}


def split_for(store: FeatureStore, spec: SplitSpec) -> np.ndarray:
    """The split of `spec` over the store's usable rows: the one an earlier version stored, if any,
    else made (deterministically: the same store and recipe give the same split everywhere)."""
    stored = read_split(store, spec.name)
    if stored is not None:
        return stored
    usable = usable_rows(store)
    labels = np.where(usable, store.column("label"), "")
    groups = store.column("group")
    if spec.duplicates:
        groups = merged_groups(store, spec.duplicates_backbone, spec.duplicates, usable & (labels != ""))
    return make_split(labels, groups, spec)


def merged_groups(store: FeatureStore, backbone: str, threshold: float, rows: np.ndarray) -> np.ndarray:
    """The store's groups with every cluster of duplicates among `rows` (the same file by SHA-256, or
    embeddings of cosine similarity >= threshold) made one group: all the lesion groups a cluster touches
    are joined (a group is named after its first member group)."""
    from features.duplicates import clusters, exact_pairs, store_near_pairs

    groups = np.asarray(store.column("group"), dtype=object)
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
    rows = rows[store.done(backbone)[rows]]
    near = store_near_pairs(store, backbone, rows, threshold)
    sha = np.where(np.isin(np.arange(len(groups)), rows), store.column("sha256"), "")
    exact_first, exact_second = exact_pairs(sha)
    names, index = np.unique(groups.astype(str), return_inverse=True)
    first = index[np.concatenate([near.first, exact_first]).astype(np.int64)]
    second = index[np.concatenate([near.second, exact_second]).astype(np.int64)]
    component = clusters(len(names), first, second)  # over groups: 0 for a group in no pair
    merged = names.astype(object)
    for c in np.unique(component[component > 0]):
        members = np.flatnonzero(component == c)
        merged[members] = names[members.min()]
    return merged[index]


def split_digest(ids: np.ndarray | list[str], split: np.ndarray) -> str:
    """A short hash of which image is on which side: two runs with the same digest were tested on the
    same rows."""
    digest = hashlib.sha256()
    for image_id, fold in zip(ids, np.asarray(split).tolist()):
        digest.update(f"{image_id}\t{fold}\n".encode())
    return digest.hexdigest()[:16]


def lesions_in_test(labels: np.ndarray, groups: np.ndarray, split: np.ndarray) -> dict[str, int]:
    """Lesions (groups) per class in the test part."""
    labels, groups = np.asarray(labels, dtype=object), np.asarray(groups, dtype=object)
    test = np.asarray(split) == TEST
    return {c: len(set(groups[test & (labels == c)])) for c in sorted(set(labels[np.asarray(split) != UNUSED]))}


def spec_from_name(name: str) -> SplitSpec:
    """The recipe back from a split's name (`grouped-test20-k5-seed0`)."""
    match = re.fullmatch(r"grouped-test(\d+)-k(\d+)-seed(-?\d+)(?:-dup([0-9.e-]+)-(.+))?", name)
    if not match:
        raise ValueError(f"not a split name: {name!r}")
    spec = SplitSpec(int(match.group(1)) / 100, int(match.group(2)), int(match.group(3)))
    if match.group(4):
        spec = SplitSpec(spec.test_fraction, spec.folds, spec.seed, float(match.group(4)), match.group(5))
    return spec


def small_test(lesions: dict[str, int]) -> str:
    """What is wrong with a test part that has fewer than MIN_TEST_LESIONS lesions of a class ("" when
    nothing is): the line a refusal says, and the warning every figure carries when told to go on."""
    short = {c: n for c, n in lesions.items() if n < MIN_TEST_LESIONS}
    if not short:
        return ""
    listed = ", ".join(f"{n} of {c!r}" for c, n in short.items())
    return (
        f"the test part holds only {listed} lesions (fewer than {MIN_TEST_LESIONS} per class): "
        "its figures are too uncertain to mean much"
    )
