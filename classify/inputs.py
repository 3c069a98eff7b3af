"""What a head sees: one backbone's embeddings or several concatenated, the mean of the test-time
views or every view, and optionally encoded metadata columns.

With `views="all"` the matrix is (n, V, d): a head is trained on every view as its own sample and
predicts the mean of its probabilities over an image's views (`fit_views` / `proba_views`).

Reading the matrix out of the store (in memory, or streamed in blocks when it exceeds the memory
budget) is features/rows.py's job; this module says what to read and encodes the metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from features.store import FeatureStore, StoreError

if TYPE_CHECKING:
    from classify.heads import Head

__all__ = ["VIEW_MODES", "InputSpec", "MetaEncoder", "fit_views", "proba_views", "store_meta"]

VIEW_MODES = ("mean", "all")


@dataclass(frozen=True)
class InputSpec:
    """The inputs of a head: which backbones, which views, which metadata columns."""

    backbones: tuple[str, ...]
    views: str = "mean"
    meta: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.views not in VIEW_MODES:
            raise ValueError(f"views {self.views!r}: choose {', '.join(VIEW_MODES)}")

    @property
    def all_views(self) -> bool:
        """Every test-time view as its own row (n, V, d), not their stored mean."""
        return self.views == "all"

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(backbones=tuple(d["backbones"]), views=d["views"], meta=tuple(d["meta"]))


class MetaEncoder:
    """Numbers as (value, missing flag) with blanks set to the training median; text one-hot over the
    training categories (blank or unseen: all zeros). Fitted without labels; saved as JSON."""

    def __init__(self, columns: dict[str, dict]) -> None:
        self.columns = columns

    @classmethod
    def fit(cls, meta: dict[str, np.ndarray]) -> "MetaEncoder":
        columns: dict[str, dict] = {}
        for name, values in meta.items():
            numbers = _as_numbers(values)
            if numbers is not None:
                finite = numbers[~np.isnan(numbers)]
                columns[name] = {"kind": "number", "median": float(np.median(finite)) if len(finite) else 0.0}
            else:
                categories = sorted({str(v) for v in values if str(v) != ""})
                columns[name] = {"kind": "category", "categories": categories}
        return cls(columns)

    def transform(self, meta: dict[str, np.ndarray], n: int) -> np.ndarray:
        parts = []
        for name, column in self.columns.items():
            values = meta.get(name, np.full(n, "", dtype=object))
            if column["kind"] == "number":
                numbers = _as_numbers(values)
                numbers = np.full(n, np.nan) if numbers is None else numbers
                missing = np.isnan(numbers)
                parts += [np.where(missing, column["median"], numbers), missing.astype(float)]
            else:
                text = np.array([str(v) for v in values], dtype=object)
                parts += [(text == c).astype(float) for c in column["categories"]]
        return np.column_stack(parts).astype(np.float32) if parts else np.zeros((n, 0), np.float32)

    @property
    def names(self) -> list[str]:
        names = []
        for name, column in self.columns.items():
            if column["kind"] == "number":
                names += [name, f"{name}_missing"]
            else:
                names += [f"{name}={c}" for c in column["categories"]]
        return names


def _as_numbers(values: np.ndarray) -> np.ndarray | None:
    """Float64 values (blank -> NaN) if every value is a number, else None."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return values.astype(np.float64)
    try:
        return np.array([float(v) if str(v) != "" else np.nan for v in values], dtype=np.float64)
    except ValueError:
        return None


def store_meta(store: FeatureStore, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named metadata columns of a store; a missing one is an error listing those that exist."""
    have = store.meta_columns()
    missing = [c for c in columns if c not in have]
    if missing:
        raise StoreError(f"{store.path}: no metadata column {', '.join(missing)}; it has: {', '.join(have) or 'none'}")
    return {c: store.column(f"meta/{c}").astype(object) for c in columns}


def fit_views(head: Head, x: np.ndarray, y: np.ndarray, groups: np.ndarray, **kwargs: object) -> Head:
    """Fit on (n, d), or on every view of (n, V, d) as its own sample (same label and group)."""
    if x.ndim == 3:
        v = x.shape[1]
        return head.fit(x.reshape(-1, x.shape[2]), np.repeat(y, v), groups=np.repeat(groups, v), **kwargs)
    return head.fit(x, y, groups=groups, **kwargs)


def proba_views(head: Head, x: np.ndarray) -> np.ndarray:
    """Class probabilities of (n, d), or the mean over views of (n, V, d)."""
    if x.ndim == 3:
        n, v, d = x.shape
        return head.predict_proba(x.reshape(n * v, d)).reshape(n, v, -1).mean(axis=1)
    return head.predict_proba(x)
