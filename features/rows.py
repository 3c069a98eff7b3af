"""Reading embeddings out of a feature store for a head: several backbones side by side, every view or
their mean, encoded metadata appended, rows picked by a mask. In memory when it fits the memory budget;
otherwise as `StoreRows`, a lazy matrix read from disk in blocks (heads that can learn from blocks,
XGBoost's external memory and the MLP, do; predictions are made block by block).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from features.store import FeatureStore, StoreError

__all__ = [
    "MEMORY_BUDGET",
    "StoreRows",
    "embedded_rows",
    "load_inputs",
    "machine_memory",
    "parse_budget",
    "read_embeddings",
    "with_meta",
]

MEMORY_BUDGET = "50%"
"""Default --memory-budget: this share of the machine's memory (or of the cgroup's limit)."""
IN_MEMORY_COPIES = 4
"""A matrix is loaded when this many float32 copies of it fit the budget (the study part is a copy,
heads standardise or quantise another); otherwise it is streamed."""
BLOCK_SHARE = 16
"""A streamed block of float32 rows takes at most 1/BLOCK_SHARE of the budget."""


def read_embeddings(store: FeatureStore, backbones: tuple[str, ...], *, all_views: bool = False) -> np.ndarray:
    """(N, d) or, with `all_views`, (N, V, d): the backbones' embeddings side by side."""
    parts = [store.embeddings(b, views=all_views) for b in backbones]
    if all_views and len({p.shape[1] for p in parts}) > 1:
        raise StoreError(f"{store.path}: the backbones were extracted with different numbers of views")
    return np.concatenate(parts, axis=-1)


def embedded_rows(store: FeatureStore, backbones: tuple[str, ...]) -> np.ndarray:
    """Rows embedded by every one of `backbones` (failed images are not)."""
    done = np.ones(len(store), dtype=bool)
    for backbone in backbones:
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


def load_inputs(
    store: FeatureStore,
    backbones: tuple[str, ...],
    rows: np.ndarray,
    meta: np.ndarray,
    budget: int,
    *,
    all_views: bool = False,
) -> np.ndarray | StoreRows:
    """The rows (`rows`: a boolean mask over the store) of the backbones' embeddings, with the encoded
    metadata `meta` (one row per store row): in memory when IN_MEMORY_COPIES float32 copies fit the
    budget, otherwise streamed (`StoreRows`; one view per image, the stored mean)."""
    views = max(store.views(b) for b in backbones) if all_views else 1
    dim = sum(store.dim(b) for b in backbones) * views
    needed = int(rows.sum()) * (dim + meta.shape[1]) * 4 * IN_MEMORY_COPIES
    if needed <= budget:
        return with_meta(read_embeddings(store, backbones, all_views=all_views), meta)[rows]
    if all_views:
        raise StoreError(
            f"{store.path}: --views all needs every view in memory ({needed / 2**30:.1f} GiB with "
            f"working copies, budget {budget / 2**30:.1f} GiB); use --views mean or a larger "
            "--memory-budget"
        )
    block_rows = max(256, budget // (BLOCK_SHARE * 4 * (dim + meta.shape[1])))
    return StoreRows(store, backbones, np.flatnonzero(rows), meta[rows], int(block_rows))
