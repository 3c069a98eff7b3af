"""Out-of-distribution flags: is a new image like the images the run was trained on at all?

A head gives every input a probability for its classes, a photograph of a cat included. The run also
keeps a compact description of its study rows' backbone embeddings (not metadata: the question is
whether the image looks like a dermoscopy image, which metadata cannot tell): class-conditional
Mahalanobis distance (Lee et al. 2018), per-class means and one covariance shared by the classes,
shrunk by Ledoit-Wolf (embeddings have hundreds of dimensions and a study may have fewer rows than
that, where the sample covariance is singular). A row's score is its smallest squared Mahalanobis
distance to a class mean; rows scoring beyond `threshold` are flagged.

The threshold is the OOD_PERCENTILE-th percentile of out-of-fold scores (each study fold scored by a
description fitted on the other folds), so it measures how far an unseen image of the same population
falls, not how far the rows the description was fitted on do (those sit closer). Everything is saved as
arrays in an npz read without pickle, so a run folder cannot carry code this way either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BLOCK_ROWS", "OOD_FILE", "OOD_PERCENTILE", "Ood", "fit_ood", "out_of_fold_threshold"]

OOD_PERCENTILE = 99.0
"""The threshold's percentile of the out-of-fold scores. In-distribution test rows then score beyond it
about 1 % of the time, well under the 5 % of a run's own test images the flags may cost, while images
unlike the training data (photographs, not dermoscopy) score far beyond it; a higher percentile would
rest on the few most extreme study rows, which a small study does not estimate well."""
OOD_FILE = "ood.npz"
"""The description's file in the run's head folder (hashed in the card like the head's files)."""
BLOCK_ROWS = 4096
"""Rows scored at once: the working copies stay a few (BLOCK_ROWS, d) float64 matrices."""


@dataclass
class Ood:
    """A fitted description of the study rows' embeddings and the score beyond which a row is flagged."""

    means: np.ndarray
    """(classes, d) float32: each class's mean embedding."""
    precision: np.ndarray
    """(d, d) float32: the inverse of the shared, shrunk covariance."""
    threshold: float
    """Scores above it are out of distribution (inf: nothing is flagged, before a threshold is set)."""
    classes: list[str]

    def score(self, x: np.ndarray) -> np.ndarray:
        """Each row's smallest squared Mahalanobis distance to a class mean (float64), block by block."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.means.shape[1]:
            raise ValueError(f"embeddings of shape {x.shape}: the description has {self.means.shape[1]} dimensions")
        precision = self.precision.astype(np.float64)
        means = self.means.astype(np.float64)
        out = np.empty(len(x))
        for start in range(0, len(x), BLOCK_ROWS):
            block = x[start : start + BLOCK_ROWS].astype(np.float64)
            best = np.full(len(block), np.inf)
            for mean in means:
                diff = block - mean
                best = np.minimum(best, np.einsum("ij,ij->i", diff @ precision, diff))
            out[start : start + len(block)] = best
        return out

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        """True for scores at or under the threshold (a NaN score, of no embedding, is not)."""
        return np.asarray(scores) <= self.threshold

    def save(self, path: Path) -> None:
        np.savez(
            path,
            means=self.means.astype(np.float32),
            precision=self.precision.astype(np.float32),
            threshold=np.float64(self.threshold),
            classes=np.array(self.classes, dtype=str),
        )

    @classmethod
    def load(cls, path: Path) -> Ood:
        """Data only (allow_pickle=False): a file holding objects is refused, not run."""
        with np.load(path, allow_pickle=False) as z:
            return cls(
                means=z["means"].astype(np.float32),
                precision=z["precision"].astype(np.float32),
                threshold=float(z["threshold"]),
                classes=[str(c) for c in z["classes"]],
            )


def fit_ood(x: np.ndarray, y: np.ndarray, *, threshold: float = math.inf) -> Ood:
    """Per-class means and the Ledoit-Wolf shrunk covariance of the rows about their class means."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    classes = sorted({str(c) for c in y})
    codes = np.array([classes.index(str(c)) for c in y])
    means = np.stack([x[codes == k].mean(axis=0) for k in range(len(classes))])
    shrunk = LedoitWolf(assume_centered=True).fit(x - means[codes])
    return Ood(means.astype(np.float32), shrunk.precision_.astype(np.float32), float(threshold), classes)


def out_of_fold_threshold(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> float:
    """The OOD_PERCENTILE-th percentile of the scores of each fold by a description of the other folds."""
    x, y, folds = np.asarray(x), np.asarray(y), np.asarray(folds)
    scores = []
    for k in np.unique(folds):
        held = folds == k
        scores.append(fit_ood(x[~held], y[~held]).score(x[held]))
    return float(np.percentile(np.concatenate(scores), OOD_PERCENTILE))
