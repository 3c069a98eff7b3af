"""Near-duplicate search over a store's embeddings, and the clusters that duplicates form.

Two images are near-duplicates when the cosine similarity of their embeddings is at least a threshold.
The search is blockwise so that a store larger than memory can be searched: rows are L2-normalised a
block at a time, and each block is multiplied by itself and by every later block (so each pair i < j is
seen once). Memory holds two blocks and one block x block matrix of similarities, never N x N; the
blocks are read from the HDF5 file twice over, in nested loops, rather than kept.

Exact duplicates (the same file, by SHA-256) need no embeddings at all. Both kinds of pair join rows
into clusters (connected components, by union-find), which is what a leak or a label conflict is
judged on: a chain of near-duplicates a~b~c links a and c even when a and c alone fall below the
threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from features.store import FeatureStore

__all__ = [
    "BLOCK_ROWS",
    "DEFAULT_THRESHOLD",
    "GroupAgreement",
    "Pairs",
    "array_blocks",
    "clusters",
    "exact_pairs",
    "group_agreement",
    "near_pairs",
    "nearest_similarity",
    "pair_similarity",
    "store_blocks",
    "store_near_pairs",
    "unit_rows",
]

DEFAULT_THRESHOLD = 0.95
"""Default cosine threshold for a near-duplicate. Chosen on HAM10000 (ham10000_mel_nv_150, 2000 images of
1563 lesions, efficientnet_lite0) by measuring, for thresholds 0.80 to 0.99, the precision and recall of
"the pair is one lesion" (its `lesion_id`): the lowest threshold whose precision is at least 0.9. Below
it, pairs of different lesions that merely look alike outnumber the true ones, so a flag would mostly be
wrong, and no lower threshold recovers much of the recall; the figures are in docs/commands.md."""
BLOCK_ROWS = 2048
"""Rows per block of the search: a block of 2048 x 1280 float32 is 10 MB, and the block x block
similarities 16 MB."""


@dataclass(frozen=True)
class Pairs:
    """Pairs of rows (first < second) with their cosine similarity."""

    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, as float32; an all-zero row stays zero (it is similar to nothing)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


def near_pairs(blocks: Callable[[int], Iterable[np.ndarray]], threshold: float) -> Pairs:
    """Every pair of positions i < j whose cosine similarity is >= `threshold`, in (i, j) order.

    `blocks(start)` gives the rows from position `start` to the end, as blocks in order (of any sizes):
    it is called once for the outer loop and once per outer block for the inner one, so that only two
    blocks are ever in memory."""
    firsts, seconds, sims = [], [], []
    start = 0
    for outer in blocks(0):
        a = unit_rows(outer)
        offset = start
        for inner in blocks(start):
            b = a if offset == start and len(inner) == len(a) else unit_rows(inner)
            sim = a @ b.T
            i, j = np.nonzero(sim >= threshold)
            keep = start + i < offset + j
            firsts.append(start + i[keep])
            seconds.append(offset + j[keep])
            sims.append(sim[i[keep], j[keep]])
            offset += len(inner)
        start += len(outer)
    if not firsts:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    first, second = np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)
    order = np.lexsort((second, first))
    return Pairs(first[order], second[order], np.concatenate(sims).astype(np.float32)[order])


def array_blocks(x: np.ndarray, block_rows: int) -> Callable[[int], Iterator[np.ndarray]]:
    """`near_pairs`' reader over an array in memory."""

    def read(start: int) -> Iterator[np.ndarray]:
        for k in range(start, len(x), block_rows):
            yield x[k : k + block_rows]

    return read


def store_blocks(
    store: FeatureStore, backbone: str, rows: np.ndarray, block_rows: int
) -> Callable[[int], Iterator[np.ndarray]]:
    """`near_pairs`' reader over a store: the backbone's embeddings of `rows` (sorted store rows), read
    from the file in blocks of about `block_rows` rows each time it is asked."""

    def read(start: int) -> Iterator[np.ndarray]:
        if start < len(rows):
            yield from store.read_rows((backbone,), rows[start:], block_rows)

    return read


def store_near_pairs(
    store: FeatureStore, backbone: str, rows: np.ndarray, threshold: float, *, block_rows: int = BLOCK_ROWS
) -> Pairs:
    """Near-duplicate pairs among `rows` (sorted store rows) of the backbone's embeddings, as store rows."""
    rows = np.asarray(rows, dtype=np.int64)
    found = near_pairs(store_blocks(store, backbone, rows, block_rows), threshold)
    return Pairs(rows[found.first], rows[found.second], found.similarity)


def nearest_similarity(
    queries: Callable[[int], Iterable[np.ndarray]], reference: Callable[[int], Iterable[np.ndarray]]
) -> np.ndarray:
    """For every query row, its highest cosine similarity to any reference row (-1 with no reference),
    both read in blocks (`array_blocks`, `store_blocks`): two blocks in memory at a time."""
    best = []
    for block in queries(0):
        a = unit_rows(block)
        top = np.full(len(a), -1.0, dtype=np.float32)
        for other in reference(0):
            if len(other):
                top = np.maximum(top, (a @ unit_rows(other).T).max(axis=1))
        best.append(top)
    return np.concatenate(best) if best else np.zeros(0, np.float32)


def pair_similarity(
    store: FeatureStore, backbone: str, first: np.ndarray, second: np.ndarray, *, block_rows: int = BLOCK_ROWS
) -> np.ndarray:
    """Cosine similarity of given pairs of store rows (exact duplicates the search did not report: those
    only hold the rows the pairs name)."""
    if not len(first):
        return np.zeros(0, np.float32)
    involved = np.unique(np.concatenate([first, second]))
    x = unit_rows(np.concatenate(list(store.read_rows((backbone,), involved, block_rows))))
    a, b = np.searchsorted(involved, first), np.searchsorted(involved, second)
    return np.einsum("ij,ij->i", x[a], x[b]).astype(np.float32)


def exact_pairs(sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows i < j holding the same SHA-256; a blank hash is unknown, never a duplicate."""
    sha256 = np.asarray(sha256, dtype=str)
    known = np.flatnonzero(sha256 != "")
    order = known[np.argsort(sha256[known], kind="stable")]
    firsts, seconds = [], []
    edges = np.flatnonzero(sha256[order][1:] != sha256[order][:-1]) + 1
    for members in np.split(order, edges):
        if len(members) > 1:
            i, j = np.triu_indices(len(members), 1)
            firsts.append(members[i])
            seconds.append(members[j])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    first, second = np.concatenate(firsts).astype(np.int64), np.concatenate(seconds).astype(np.int64)
    low, high = np.minimum(first, second), np.maximum(first, second)
    order = np.lexsort((high, low))
    return low[order], high[order]


def clusters(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Connected components of the pairs over `n` rows: a cluster number per row (1, 2, ... from the
    largest cluster down, ties by first row), 0 for a row in no pair."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for i, j in zip(np.asarray(first).tolist(), np.asarray(second).tolist()):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    labels = np.zeros(n, dtype=np.int64)
    paired = np.zeros(n, dtype=bool)
    paired[np.asarray(first, dtype=np.int64)] = True
    paired[np.asarray(second, dtype=np.int64)] = True
    members = np.flatnonzero(paired)
    if not len(members):
        return labels
    roots = np.array([root(i) for i in members.tolist()], dtype=np.int64)
    ids, starts, sizes = np.unique(roots, return_index=True, return_counts=True)
    ranked = ids[np.lexsort((members[starts], -sizes))]
    number = np.zeros(n, dtype=np.int64)
    number[ranked] = np.arange(1, len(ranked) + 1)
    labels[members] = number[roots]
    return labels


@dataclass(frozen=True)
class GroupAgreement:
    """How well pairs find "the same group" (lesion): `hits` of `pairs` (with both groups known) are
    one group, of `group_pairs` pairs of rows that share a group."""

    pairs: int
    hits: int
    group_pairs: int

    @property
    def precision(self) -> float:
        return self.hits / self.pairs if self.pairs else float("nan")

    @property
    def recall(self) -> float:
        return self.hits / self.group_pairs if self.group_pairs else float("nan")


def group_agreement(pairs: Pairs, groups: np.ndarray, rows: np.ndarray) -> GroupAgreement:
    """Precision and recall of `pairs` against "same group", over the searched `rows`; blank groups are
    unknown and left out of both."""
    groups = np.asarray(groups, dtype=str)
    searched = groups[np.asarray(rows, dtype=np.int64)]
    _, sizes = np.unique(searched[searched != ""], return_counts=True)
    a, b = groups[pairs.first], groups[pairs.second]
    known = (a != "") & (b != "")
    return GroupAgreement(
        pairs=int(known.sum()),
        hits=int(np.sum(known & (a == b))),
        group_pairs=int(np.sum(sizes * (sizes - 1) // 2)),
    )
