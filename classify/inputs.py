"""What a head sees: one backbone's embeddings or several concatenated, the mean of the test-time
views or every view, and optionally encoded metadata columns.

With `views="all"` the matrix is (n, V, d): a head is trained on every view as its own sample and
predicts the mean of its probabilities over an image's views (`fit_views` / `proba_views`).

A matrix that would not fit the memory budget stays on disk as `StoreRows`, read in blocks: heads that
can learn from blocks (XGBoost's external memory, the MLP) do; predictions are made block by block.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from features.store import FeatureStore, StoreError

MEMORY_BUDGET = "50%"
"""Default --memory-budget: this share of the machine's memory (or of the cgroup's limit)."""
IN_MEMORY_COPIES = 4
"""A matrix is loaded when this many float32 copies of it fit the budget (the study part is a copy,
heads standardise or quantise another); otherwise it is streamed."""
BLOCK_SHARE = 16
"""A streamed block of float32 rows takes at most 1/BLOCK_SHARE of the budget."""

VIEW_MODES = ("mean", "all")


@dataclass(frozen=True)
class InputSpec:
    """The inputs of a head: which backbones, which views, which metadata columns."""

    backbones: tuple[str, ...]
    views: str = "mean"
    meta: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(backbones=tuple(d["backbones"]), views=d["views"], meta=tuple(d["meta"]))


class MetaEncoder:
    """Numbers as (value, missing flag) with blanks set to the training median; text one-hot over the
    training categories (blank or unseen: all zeros). Fitted without labels; saved as JSON."""

    def __init__(self, columns: dict[str, dict]):
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


def embeddings(store: FeatureStore, spec: InputSpec) -> np.ndarray:
    """(N, d) or, with views="all", (N, V, d): the backbones' embeddings side by side."""
    if spec.views not in VIEW_MODES:
        raise ValueError(f"views {spec.views!r}: choose {', '.join(VIEW_MODES)}")
    parts = [store.embeddings(b, views=spec.views == "all") for b in spec.backbones]
    if spec.views == "all" and len({p.shape[1] for p in parts}) > 1:
        raise StoreError(f"{store.path}: the backbones were extracted with different numbers of views")
    return np.concatenate(parts, axis=-1)


def usable(store: FeatureStore, spec: InputSpec) -> np.ndarray:
    """Rows embedded by every backbone of `spec` (failed images are not)."""
    done = np.ones(len(store), dtype=bool)
    for backbone in spec.backbones:
        done &= store.done(backbone)
    return done


def with_meta(x: np.ndarray, meta: np.ndarray) -> np.ndarray:
    """Append encoded metadata to every row (and every view)."""
    if meta.shape[1] == 0:
        return x
    if x.ndim == 3:
        meta = np.repeat(meta[:, None, :], x.shape[1], axis=1)
    return np.concatenate([x, meta.astype(x.dtype)], axis=-1)


def parse_budget(text: str) -> int:
    """`--memory-budget`: bytes from `1.5GB`, `800MB`, `1GiB`, `50%` (of the machine's memory)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(%|[kKmMgGtT]i?[bB]?|[bB]?)\s*", text)
    if not match:
        raise ValueError(f"--memory-budget {text!r}: write it as 1GB, 800MB or 50%")
    value, unit = float(match.group(1)), match.group(2).upper().rstrip("B").rstrip("I")
    if match.group(2) == "%":
        return int(machine_memory() * value / 100)
    return int(value * 1024 ** " KMGT".index(unit or " "))


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        total = min(total, int(limit.read_text()))
    return total


@dataclass(frozen=True)
class StoreRows:
    """A lazy (n, d) float32 matrix: rows of a store's embeddings (backbones side by side, then the
    encoded metadata) that stay on disk and are read in blocks. Indexing with a boolean mask or sorted
    positions gives another StoreRows; nothing is read until `blocks()`. Turning it into an array is
    refused: that would load what the budget said does not fit."""

    store: FeatureStore
    backbones: tuple[str, ...]
    rows: np.ndarray
    """Sorted store rows."""
    meta: np.ndarray
    """(len(rows), m) encoded metadata."""
    block_rows: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), sum(self.store.dim(b) for b in self.backbones) + self.meta.shape[1]

    ndim = 2

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> "StoreRows":
        key = np.asarray(key)
        if key.dtype != bool and len(key) > 1 and np.any(np.diff(key) <= 0):
            raise ValueError("StoreRows: index with a mask or sorted positions (labels must stay aligned)")
        return replace(self, rows=self.rows[key], meta=self.meta[key])

    def __array__(self, *args, **kwargs):
        raise TypeError(
            f"{self.store.path}: {len(self)} rows are streamed from disk (larger than the memory "
            "budget); this step would load them all"
        )

    def blocks(self) -> Iterator[np.ndarray]:
        """The rows in order, as float32 blocks of about `block_rows` rows."""
        done = 0
        for block in self.store.read_rows(self.backbones, self.rows, self.block_rows):
            yield with_meta(block, self.meta[done : done + len(block)])
            done += len(block)

    def sample(self, n: int, seed: int) -> np.ndarray:
        """Up to `n` rows picked at random, in memory (for quantiles and other statistics)."""
        if len(self) <= n:
            return np.concatenate(list(self.blocks()))
        picked = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        return np.concatenate(list(self[picked].blocks()))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Column means and standard deviations, in one pass (float64 sums)."""
        total, squares = 0.0, 0.0
        for block in self.blocks():
            total = total + block.sum(axis=0, dtype=np.float64)
            squares = squares + np.square(block, dtype=np.float64).sum(axis=0)
        mean = total / len(self)
        return mean.astype(np.float32), np.sqrt(np.maximum(squares / len(self) - mean**2, 0)).astype(np.float32)


def inputs_matrix(
    store: FeatureStore, spec: InputSpec, rows: np.ndarray, meta: np.ndarray, budget: int
) -> np.ndarray | StoreRows:
    """The rows (`rows`: a boolean mask over the store) of the inputs of `spec`, with the encoded
    metadata `meta` (one row per store row): in memory when IN_MEMORY_COPIES float32 copies fit the
    budget, otherwise streamed (`StoreRows`; one view per image, the stored mean)."""
    views = 1 if spec.views == "mean" else max(store.views(b) for b in spec.backbones)
    dim = sum(store.dim(b) for b in spec.backbones) * views
    needed = int(rows.sum()) * (dim + meta.shape[1]) * 4 * IN_MEMORY_COPIES
    if needed <= budget:
        return with_meta(embeddings(store, spec), meta)[rows]
    if spec.views != "mean":
        raise StoreError(
            f"{store.path}: --views all needs every view in memory ({needed / 2**30:.1f} GiB with "
            f"working copies, budget {budget / 2**30:.1f} GiB); use --views mean or a larger "
            "--memory-budget"
        )
    block_rows = max(256, budget // (BLOCK_SHARE * 4 * (dim + meta.shape[1])))
    return StoreRows(store, spec.backbones, np.flatnonzero(rows), meta[rows], int(block_rows))


def fit_views(head, x: np.ndarray, y: np.ndarray, groups: np.ndarray, **kwargs):
    """Fit on (n, d), or on every view of (n, V, d) as its own sample (same label and group)."""
    if x.ndim == 3:
        v = x.shape[1]
        return head.fit(x.reshape(-1, x.shape[2]), np.repeat(y, v), groups=np.repeat(groups, v), **kwargs)
    return head.fit(x, y, groups=groups, **kwargs)


def proba_views(head, x: np.ndarray) -> np.ndarray:
    """Class probabilities of (n, d), or the mean over views of (n, V, d)."""
    if x.ndim == 3:
        n, v, d = x.shape
        return head.predict_proba(x.reshape(n * v, d)).reshape(n, v, -1).mean(axis=1)
    return head.predict_proba(x)
