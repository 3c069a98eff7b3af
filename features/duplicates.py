"""Near-duplicate search over a store's embeddings, and the clusters that duplicates form.

Two images are near-duplicates when the cosine similarity of their embeddings is at least a threshold.
The search is blockwise so that a store larger than memory can be searched: rows are L2-normalised a
block at a time, and each outer block is multiplied by itself and by every later block (so each pair
i < j is seen once). Memory holds an outer and an inner block and their matrix of similarities, never
N x N; the blocks are read from the HDF5 file in nested loops rather than kept. The products are the
whole cost (N^2/2 dot products), so they run in bfloat16 where the hardware is faster at it, as a
screen with a proven margin, and the pairs it passes are measured again in float32 (`Screen`).

Exact duplicates (the same file, by SHA-256) need no embeddings at all. Both kinds of pair join rows
into clusters (connected components, by union-find), which is what a leak or a label conflict is
judged on: a chain of near-duplicates a~b~c links a and c even when a and c alone fall below the
threshold.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from features.store import FeatureStore

__all__ = [
    "BLOCK_ROWS",
    "DEFAULT_THRESHOLD",
    "FAST_SCREEN_ROWS",
    "GroupAgreement",
    "OUTER_BLOCKS",
    "Pairs",
    "SCREEN_MARGIN",
    "Screen",
    "array_blocks",
    "clusters",
    "exact_pairs",
    "fastest_screen",
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
BLOCK_ROWS = 4096
"""Rows per inner block of the search (an outer block is OUTER_BLOCKS of them): an outer block of
16384 x 1280 float32 is 84 MB, and its similarities to one inner block 128 MB in bfloat16."""


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


SCREEN_MARGIN = 0.02
"""How far below the threshold a bfloat16 screen passes pairs on to be measured in float32. Rounding a unit
row to bfloat16 moves it by at most 2^-8 of its length, so the product of two rounded rows is within
about 2 x 2^-8 of the true cosine, and rounding the result adds at most 2^-8 more: under 0.012 in all.
With this margin no pair at or above the threshold is missed, and the float32 measure decides."""
OUTER_BLOCKS = 4
"""Blocks joined into one outer block: every inner block is read once per outer block, so a larger outer
block reads the file fewer times (a store of N rows is read about N / (OUTER_BLOCKS x block rows) times)."""


FAST_SCREEN_ROWS = 50_000
"""Searches of fewer rows are screened in float32 (see `near_pairs`)."""
PROGRESS_SECONDS = 30
"""A search longer than this logs its progress at most this often."""
log = logging.getLogger("features")


@dataclass(frozen=True)
class Screen:
    """The matrix product that finds candidate pairs: bfloat16 where the hardware multiplies it faster than
    float32 (a GPU; a CPU with AMX or AVX512-BF16), else float32. Candidates are measured again in float32
    from the float32 rows, so the screen changes the speed of the search, never its pairs."""

    device: str
    dtype_name: str

    @property
    def margin(self) -> float:
        return SCREEN_MARGIN if self.dtype_name == "bfloat16" else 1e-5  # float32: summation order only

    def candidates(self, a: np.ndarray, b: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Positions (i, j) of the pairs of rows of `a` and `b` (unit rows) that may reach `threshold`."""
        import torch

        dtype = getattr(torch, self.dtype_name)
        ta = torch.from_numpy(a).to(self.device, dtype)
        tb = ta if b is a else torch.from_numpy(b).to(self.device, dtype)
        i, j = torch.nonzero(ta @ tb.T >= threshold - self.margin, as_tuple=True)
        return i.cpu().numpy(), j.cpu().numpy()


@functools.cache
def fastest_screen() -> Screen:
    """bfloat16 on CUDA; on a CPU whichever of bfloat16 and float32 multiplies a block faster here."""
    import torch

    if torch.cuda.is_available():
        return Screen("cuda", "bfloat16")
    x = torch.randn(1024, 1024)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = x.to(dtype)
        a @ a.T  # the first call sets up the kernel
        started = time.perf_counter()
        for _ in range(3):
            a @ a.T
        seconds[str(dtype).removeprefix("torch.")] = time.perf_counter() - started
    return Screen("cpu", "bfloat16" if seconds["bfloat16"] < 0.75 * seconds["float32"] else "float32")


def near_pairs(
    blocks: Callable[[int], Iterable[np.ndarray]],
    threshold: float,
    *,
    outer_blocks: int = OUTER_BLOCKS,
    screen: Screen | None = None,
    total: int = 0,
) -> Pairs:
    """Every pair of positions i < j whose cosine similarity is >= `threshold`, in (i, j) order.

    `blocks(start)` gives the rows from position `start` to the end, as blocks in order (of any sizes):
    it is called once for the outer loop, whose blocks are joined `outer_blocks` at a time, and once per
    outer block for the inner loop over the rows after it, so that only an outer and an inner block are
    ever in memory. Pairs are screened by `screen` (default: `fastest_screen()`) and measured in float32.
    `total`, the number of rows, lets a long search log its progress, and a search of at least
    FAST_SCREEN_ROWS rows use `fastest_screen()` (a smaller one is screened in float32: there the
    bfloat16 gain is a fraction of a second, less than timing the two products costs)."""
    if screen is None:
        screen = fastest_screen() if total >= FAST_SCREEN_ROWS else Screen("cpu", "float32")
    started = last_log = time.monotonic()
    firsts, seconds, sims = [], [], []

    def collect(a: np.ndarray, b: np.ndarray, a_start: int, b_start: int) -> None:
        i, j = screen.candidates(a, b, threshold)
        if b is a:
            i, j = i[i < j], j[i < j]
        sim = np.einsum("ij,ij->i", a[i], b[j])
        keep = sim >= threshold
        firsts.append(a_start + i[keep])
        seconds.append(b_start + j[keep])
        sims.append(sim[keep])

    start = 0
    outer_iter = iter(blocks(0))
    while True:
        joined = list(itertools.islice(outer_iter, outer_blocks))
        if not joined:
            break
        a = unit_rows(np.concatenate(joined))
        collect(a, a, start, start)
        offset = start + len(a)
        for inner in blocks(offset):
            if len(inner):
                collect(a, unit_rows(inner), start, offset)
            offset += len(inner)
        start += len(a)
        if total and time.monotonic() - last_log > PROGRESS_SECONDS and start < total:
            last_log = time.monotonic()
            done = 1 - ((total - start) / total) ** 2  # share of the pairs compared
            log.info(
                "near-duplicate search: %d of %d rows against the rest (%.0f %% of the pairs), %.0f s, %.0f s left",
                start,
                total,
                100 * done,
                last_log - started,
                (last_log - started) * (1 - done) / done,
            )
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
    found = near_pairs(store_blocks(store, backbone, rows, block_rows), threshold, total=len(rows))
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
