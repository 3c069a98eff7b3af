"""Predictions as the ISIC challenges' own scorers read them (`predict --format isic`, `evaluate
--format isic`): the challenge's category columns, every one present, probabilities as floats, nothing
else (`isic-challenge-scoring` refuses a file with missing or extra columns).

A run's classes are mapped onto a challenge's categories by name, case and the usual synonyms aside
(`mel`/`melanoma` -> MEL, `nv`/`nevus` -> NV, `ak`/`akiec` -> AKIEC or AK); a category the run does not
have gets probability 0. `isic` picks the first challenge whose categories hold every class of the run;
ISIC 2020 scores one column, `target`, the probability of malignancy: the sum of the run's malignant
classes (`malignant`, or the malignant diagnoses).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np

from classify.metrics import MALIGNANT
from classify.runs import RunError

__all__ = ["CHALLENGES", "FORMATS", "Challenge", "challenge_for", "challenge_csv"]

SYNONYMS = {"melanoma": "mel", "nevus": "nv", "naevus": "nv", "ak": "akiec", "actinic keratosis": "akiec"}
"""Class names that mean a category under another name (lower-case)."""


@dataclass(frozen=True)
class Challenge:
    """One challenge's submission format: its image column, its categories (columns, in its order) and
    which class names (lower-case, after SYNONYMS) each takes."""

    name: str
    image_column: str
    categories: dict[str, tuple[str, ...]]
    unscored: tuple[str, ...] = ()
    """Classes it takes without a column of their own (ISIC 2020 scores malignancy only: `benign`)."""

    def takes(self, classes: list[str]) -> bool:
        return all(self.category_of(c) is not None or c.lower() in self.unscored for c in classes)

    def category_of(self, name: str) -> str | None:
        key = SYNONYMS.get(name.lower(), name.lower())
        return next((cat for cat, names in self.categories.items() if key in names), None)


CHALLENGES: dict[str, Challenge] = {
    "isic2018": Challenge(
        "ISIC 2018 task 3 (HAM10000)",
        "image",
        {c.upper(): (c,) for c in ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")},
    ),
    "isic2019": Challenge(
        "ISIC 2019",
        "image",
        {
            **{c.upper(): (c,) for c in ("mel", "nv", "bcc")},
            "AK": ("akiec",),
            **{c.upper(): (c,) for c in ("bkl", "df", "vasc", "scc", "unk")},
        },
    ),
    "isic2020": Challenge(
        "ISIC 2020",
        "image_name",
        {"target": ("malignant", "1", *MALIGNANT)},
        unscored=("benign", "0"),
    ),
}
"""The challenges, in the order `isic` tries them."""
FORMATS = ("csv", "isic", *CHALLENGES)
"""`--format`: the toolkit's own CSV, the first challenge that takes the run's classes, or one by name."""


def challenge_for(fmt: str, classes: list[str]) -> Challenge | None:
    """The challenge `fmt` names (`isic`: the first that takes every class; None for `csv`, the toolkit's
    own), or a RunError saying why the classes do not map (checked before any work)."""
    if fmt == "csv":
        return None
    if fmt == "isic":
        for challenge in CHALLENGES.values():
            if challenge.takes(classes):
                return challenge
        raise RunError(
            f"--format isic: the run's classes ({', '.join(classes)}) are not all ISIC diagnosis categories "
            "(mel, nv, bcc, akiec, bkl, df, vasc, scc, unk, or malignant); write --format csv"
        )
    challenge = CHALLENGES[fmt]
    unknown = [c for c in classes if challenge.category_of(c) is None and c.lower() not in challenge.unscored]
    if unknown:
        raise RunError(f"--format {fmt}: {', '.join(unknown)} is not a category of {challenge.name}")
    return challenge


def challenge_csv(challenge: Challenge, ids: np.ndarray, proba: np.ndarray, classes: list[str]) -> str:
    """The submission: the image column, then each category's probability (summed over the classes that
    map onto it; 0 for a category no class maps onto)."""
    columns = list(challenge.categories)
    table = np.zeros((len(ids), len(columns)))
    for k, c in enumerate(classes):
        category = challenge.category_of(c)
        if category is not None:
            table[:, columns.index(category)] += proba[:, k]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([challenge.image_column, *columns])
    for image_id, row in zip(ids, table):
        writer.writerow([str(image_id), *(f"{p:.6f}" for p in row)])
    return buffer.getvalue()
