"""A 2-D map of a feature store: one point per image, placed so that images whose embeddings are close
lie close, coloured by label, by split, or by a metadata column (`cli.py map`, and a section of a run's
report). A map shows at a glance whether a backbone separates the classes, whether the test part covers
the same ground as the study part, and whether a site, a scanner or an age band forms its own island
(a shortcut a head can learn instead of the lesion).

Projection: the embeddings are reduced by PCA to PCA_DIMS dimensions, then laid out by t-SNE
(scikit-learn, PCA initialisation, a fixed seed). UMAP (`umap-learn`) was measured against it on a
HAM10000 store of 2000 images x 1280 dimensions (efficientnet_lite0) and on 5000 rows: UMAP's own
optimisation is faster, but numba compiles its functions on first use in every process, so a single
`cli.py map` (one map per process) took longer with UMAP than with t-SNE; and t-SNE kept the 50-D
neighbourhoods better (higher trustworthiness, the same 5-nearest-neighbour label accuracy on the map
as in 50-D). t-SNE needs no new dependency, and is deterministic for a seed. It keeps neighbourhoods,
not distances: the size of an island and the gap between two say little; the PCA start keeps the
coarse layout of the data. ITERATIONS is half scikit-learn's default: the second half barely moved the
measured map, and halves the time. t-SNE's gradient runs on OpenMP threads, which spin against other
busy processes: on a small shared machine `OMP_NUM_THREADS=1` is the faster setting (same map).

Large stores: at most `max_points` rows are mapped, a sample stratified by label with a fixed seed (the
caption says so); only those rows are read from the store. Embeddings are the store's `data`, which for
a backbone extracted with test-time views is already the mean of its views.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from classify.runs import load_run, read_run_split, run_split  # noqa: E402
from classify.subgroups import MISSING, bin_values  # noqa: E402
from features.splits import TEST, UNUSED, SplitSpec, split_for  # noqa: E402
from features.store import FeatureStore  # noqa: E402

__all__ = [
    "COLOURINGS",
    "Colours",
    "EmbeddingMap",
    "MAX_POINTS",
    "MapError",
    "caption",
    "colouring",
    "compute_map",
    "map_svg",
    "palette",
    "stratified_sample",
    "write_map_png",
]

METHOD = "t-SNE"
PCA_DIMS = 50
"""Dimensions kept before t-SNE: it removes noise, and t-SNE's neighbour search is cheap in 50-D."""
PERPLEXITY = 30.0
"""Scikit-learn's default; lowered to (n - 1) / 3 for small maps, as t-SNE needs it below n."""
ITERATIONS = 500
MIN_POINTS = 4
"""Fewer rows than this cannot be laid out by t-SNE."""
MAX_POINTS = 5000
"""Default cap on mapped rows: t-SNE's time grows faster than the rows, and a report's inline SVG holds
one element per point."""
READ_BLOCK = 4096
"""Store rows per read window: memory holds about two windows of one backbone's rows."""
MAX_SHOWN = 12
"""Categories of a colouring with a colour of their own; the rarer ones share OTHER."""
UNLABELLED, OTHER = "unlabelled", "other values"
NEUTRAL = frozenset({MISSING, UNLABELLED, OTHER, "unused"})
"""Categories that stand for no value: grey, so that the eye goes to the others."""
GREY = "#b0b0b0"
SIDES = ("study", "test", "unused")


class MapError(ValueError):
    """A map that cannot be made as asked: no embeddings, several backbones and none named, too few rows,
    an unknown colouring."""


@dataclass(frozen=True)
class EmbeddingMap:
    """The 2-D layout of (a sample of) the rows one backbone embedded."""

    image_id: np.ndarray
    xy: np.ndarray
    """(n, 2) coordinates; only their neighbourhoods mean something, not their scale."""
    rows: np.ndarray
    """Sorted store rows, one per point."""
    backbone: str
    method: str
    total: int
    """Rows the backbone embedded; more than `len(rows)` when the map is of a sample."""
    seed: int

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def sampled(self) -> bool:
        return len(self.rows) < self.total


@dataclass(frozen=True)
class Colours:
    """What colours the points: a category per point, and the legend's order of the categories."""

    by: str
    category: np.ndarray
    order: tuple[str, ...]
    ordinal: bool = False
    """Categories are ordered values (numbers, bins of numbers): coloured along one scale."""

    def counts(self) -> dict[str, int]:
        counted = Counter(self.category.tolist())
        return {c: counted[c] for c in self.order}


def stratified_sample(strata: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted positions of `k` rows drawn at random so that each stratum keeps its share (to one row).
    Each row gets its quantile within its stratum in a seeded shuffle; the k lowest are taken, so every
    stratum is cut at about the same quantile k / n."""
    n = len(strata)
    if k >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    _, codes, sizes = np.unique(strata, return_inverse=True, return_counts=True)
    shuffled = rng.permutation(n)
    by_stratum = shuffled[np.argsort(codes[shuffled], kind="stable")]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    rank = np.empty(n)
    rank[by_stratum] = np.arange(n) - starts[codes[by_stratum]]
    quantile = (rank + 0.5) / sizes[codes]
    tiebreak = np.empty(n)
    tiebreak[shuffled] = np.arange(n)
    return np.sort(np.lexsort((tiebreak, quantile))[:k])


def compute_map(
    store_path: str | Path, *, backbone: str | None = None, max_points: int = MAX_POINTS, seed: int = 0
) -> EmbeddingMap:
    """The t-SNE map of the rows `backbone` embedded (at most `max_points`, stratified by label). `seed`
    draws the sample; the layout of given rows is the same on every call (PCA initialisation)."""
    if max_points < MIN_POINTS:
        raise MapError(f"max_points {max_points}: a map needs at least {MIN_POINTS} points")
    store = FeatureStore(store_path)
    backbone = store.pick_backbone(backbone)
    embedded = np.flatnonzero(store.done(backbone))
    if len(embedded) < MIN_POINTS:
        raise MapError(f"{store.path}: {backbone} embedded {len(embedded)} images; a map needs at least {MIN_POINTS}")
    picked = stratified_sample(store.column("label")[embedded], max_points, seed)
    rows = embedded[picked]
    x = np.concatenate(list(store.read_rows((backbone,), rows, READ_BLOCK)))
    if x.shape[1] > PCA_DIMS:
        x = PCA(min(PCA_DIMS, len(x)), random_state=seed).fit_transform(x)
    perplexity = min(PERPLEXITY, (len(x) - 1) / 3)
    tsne = TSNE(2, perplexity=perplexity, init="pca", max_iter=ITERATIONS, random_state=seed)
    xy = tsne.fit_transform(x.astype(np.float64))
    return EmbeddingMap(
        image_id=store.column("image_id")[rows],
        xy=xy,
        rows=rows,
        backbone=backbone,
        method=METHOD,
        total=len(embedded),
        seed=seed,
    )


# ------------------------------------------------------------------------------------------ colourings

Colouring = Callable[[FeatureStore, EmbeddingMap, Path | None], Colours]
"""A colouring: the store, the map, and a run folder (only `split` reads it)."""


def by_label(store: FeatureStore, emap: EmbeddingMap, run: Path | None) -> Colours:
    labels = store.column("label")[emap.rows].astype(object)
    labels[labels == ""] = UNLABELLED
    return Colours("label", labels, _ordered(labels, sorted(set(labels.tolist()))))


def by_split(store: FeatureStore, emap: EmbeddingMap, run: Path | None) -> Colours:
    """The default split that `fit` makes of the store, or, given a run folder, the run's own split
    (matched by image id: an image the run never saw is `unused`)."""
    if run is None:
        folds = split_for(store, SplitSpec())[emap.rows]
        by = f"split ({SplitSpec().name})"
    else:
        recorded = read_run_split(run) or run_split(load_run(run))  # loading the head only for old runs
        known = dict(zip(recorded.image_id.tolist(), recorded.fold.tolist()))
        folds = np.array([known.get(i, UNUSED) for i in emap.image_id.tolist()], dtype=np.int8)
        by = f"split of run {Path(run).name}"
    sides = np.where(folds == TEST, "test", np.where(folds == UNUSED, "unused", "study")).astype(object)
    return Colours(by, sides, _ordered(sides, list(SIDES)))


def by_column(name: str) -> Colouring:
    """A metadata column, grouped as the subgroup figures group it (classify/subgroups.py): age bands,
    quartiles of other numbers with many values, blanks as `missing`."""

    def colour(store: FeatureStore, emap: EmbeddingMap, run: Path | None) -> Colours:
        values = store.column(f"meta/{name}")[emap.rows]
        groups = bin_values(name, values)
        numbers = np.array([_number(v) for v in values.tolist()])
        numeric = not np.isnan(numbers[groups != MISSING]).any() and (groups != MISSING).any()
        if numeric:  # bins in the order of the numbers they hold
            middle = {g: np.median(numbers[groups == g]) for g in set(groups.tolist()) - {MISSING}}
            order = sorted(middle, key=middle.get)
        else:
            counted = Counter(groups[groups != MISSING].tolist())
            shown = {g for g, _ in counted.most_common(MAX_SHOWN - 1)} if len(counted) > MAX_SHOWN else set(counted)
            groups = np.where(np.isin(groups, list(shown)) | (groups == MISSING), groups, OTHER).astype(object)
            order = sorted(shown)
        return Colours(name, groups, _ordered(groups, order), ordinal=numeric)

    return colour


COLOURINGS: dict[str, Colouring] = {"label": by_label, "split": by_split}
"""Colourings by name; any other name is a metadata column of the store."""


def colouring(store_path: str | Path, emap: EmbeddingMap, color: str, *, run: str | Path | None = None) -> Colours:
    """The points of `emap` (a map of the store at `store_path`) coloured by `color`: a name of COLOURINGS
    or a metadata column of the store; `run` (a run folder) gives `split` that run's split instead of
    the default one."""
    store = FeatureStore(store_path)
    if len(store) <= emap.rows.max() or not np.array_equal(store.column("image_id")[emap.rows], emap.image_id):
        raise MapError(f"{store.path}: the map was made of another store (its image ids differ)")
    if color in COLOURINGS:
        return COLOURINGS[color](store, emap, None if run is None else Path(run))
    columns = store.meta_columns()
    if color not in columns:
        raise MapError(
            f"{store.path}: no colouring {color!r}; choose {', '.join(COLOURINGS)} or a metadata column "
            f"({', '.join(columns) or 'the store has none'})"
        )
    return by_column(color)(store, emap, None)


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return np.nan


def _ordered(category: np.ndarray, order: list[str]) -> tuple[str, ...]:
    """The categories present, in `order`, then those standing for no value."""
    present = set(category.tolist())
    return tuple(c for c in order if c in present and c not in NEUTRAL) + tuple(
        c for c in (*order, MISSING, UNLABELLED, OTHER) if c in present and c in NEUTRAL
    )


# ------------------------------------------------------------------------------------------ drawing


def palette(colours: Colours) -> dict[str, str]:
    """A colour (hex) per category, shared by the PNG and the SVG: a sequential scale for ordered
    categories, distinct hues otherwise, grey for those that stand for no value."""
    named = [c for c in colours.order if c not in NEUTRAL]
    if colours.ordinal:
        cmap = plt.get_cmap("viridis")
        hues = [cmap(k / max(len(named) - 1, 1) * 0.9) for k in range(len(named))]
    else:
        cmap = plt.get_cmap("tab10" if len(named) <= 10 else "tab20")
        hues = [cmap(k % cmap.N) for k in range(len(named))]
    return {**{c: to_hex(h) for c, h in zip(named, hues)}, **{c: GREY for c in colours.order if c in NEUTRAL}}


def caption(emap: EmbeddingMap, colours: Colours) -> str:
    """The one line that says what a map shows: its title in the PNG and the SVG."""
    shown = (
        f"{len(emap)} of {emap.total} images, a sample stratified by label (seed {emap.seed})"
        if emap.sampled
        else f"{len(emap)} images"
    )
    return f"{emap.method} of {emap.backbone} embeddings, coloured by {colours.by}; {shown}"


def _draw_order(colours: Colours) -> list[str]:
    """Large categories first, so that small ones are drawn on top and stay visible."""
    counts = colours.counts()
    return sorted(colours.order, key=lambda c: -counts[c])


def write_map_png(emap: EmbeddingMap, colours: Colours, path: str | Path) -> Path:
    """The map as a PNG: points by category, a legend with each category's count, the caption as title."""
    path = Path(path)
    hue, counts = palette(colours), colours.counts()
    size = 5 if len(emap) > 2000 else 12
    fig, ax = plt.subplots(figsize=(9, 6.5))
    for c in _draw_order(colours):
        at = colours.category == c
        ax.scatter(emap.xy[at, 0], emap.xy[at, 1], s=size, color=hue[c], label=f"{c} ({counts[c]})", linewidths=0)
    handles, names = ax.get_legend_handles_labels()
    order = [names.index(f"{c} ({counts[c]})") for c in colours.order]
    ax.legend(
        [handles[k] for k in order],
        [names[k] for k in order],
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        markerscale=2,
        frameon=False,
        title=colours.by,
    )
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption(emap, colours), fontsize=9, wrap=True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


SVG_PLOT = 560
"""Side of the SVG's square plot area, in its own units (the viewBox scales it to the page)."""
SVG_LEGEND = 220
SVG_TOP = 28


def map_svg(emap: EmbeddingMap, colours: Colours) -> str:
    """The map as one self-contained inline <svg> (no script, nothing external): a <circle> per point whose
    <title> (the image id and its category) shows on hover, a legend, the caption, and a viewBox so that it
    scales to the page."""
    hue, counts = palette(colours), colours.counts()
    pad = 8
    lo, hi = emap.xy.min(axis=0), emap.xy.max(axis=0)
    scale = (SVG_PLOT - 2 * pad) / max(float((hi - lo).max()), 1e-12)
    centre = (SVG_PLOT - scale * (hi - lo)) / 2
    x = centre[0] + scale * (emap.xy[:, 0] - lo[0])
    y = SVG_TOP + SVG_PLOT - (centre[1] + scale * (emap.xy[:, 1] - lo[1]))  # up is up, as in the PNG
    radius = 2 if len(emap) > 2000 else 3
    width, height = SVG_PLOT + SVG_LEGEND, SVG_TOP + max(SVG_PLOT, 24 + 18 * len(colours.order))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(caption(emap, colours))}" font-family="sans-serif" font-size="12">',
        f'<text x="{pad}" y="18">{html.escape(caption(emap, colours))}</text>',
        f'<rect x="0" y="{SVG_TOP}" width="{SVG_PLOT}" height="{SVG_PLOT}" fill="none" stroke="#ddd"/>',
    ]
    for c in _draw_order(colours):
        parts.append(f'<g fill="{hue[c]}" fill-opacity="0.8">')
        label = html.escape(c)
        for k in np.flatnonzero(colours.category == c):
            parts.append(
                f'<circle cx="{x[k]:.1f}" cy="{y[k]:.1f}" r="{radius}">'
                f"<title>{html.escape(str(emap.image_id[k]))}: {label}</title></circle>"
            )
        parts.append("</g>")
    left = SVG_PLOT + 16
    parts.append(f'<text x="{left}" y="{SVG_TOP + 12}" font-weight="bold">{html.escape(colours.by)}</text>')
    for k, c in enumerate(colours.order):
        top = SVG_TOP + 30 + 18 * k
        parts.append(f'<circle cx="{left + 5}" cy="{top - 4}" r="5" fill="{hue[c]}"/>')
        parts.append(f'<text x="{left + 16}" y="{top}">{html.escape(c)} ({counts[c]})</text>')
    parts.append("</svg>")
    return "\n".join(parts)
