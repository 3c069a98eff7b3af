"""`cli.py audit --features S.h5`: duplicates in a store, and whether they leak across its splits.

A lesion photographed twice, or one file copied under two names, inflates test figures when the copies
land on both sides of a split, and confuses a head when the copies carry different labels. The audit
finds exact duplicates (the same SHA-256) and near-duplicates (embeddings of cosine similarity >= T,
features/duplicates.py), joins them into clusters, and reports per split the clusters with members in
the test part and in the study part, and the clusters whose members disagree on the label. When the
store has lesion groups, the near-duplicate pairs are also scored against "same group": the way the
default threshold was chosen, and the way a user checks it on their own data.

Outputs (a folder, `<store stem>-audit/` beside the store unless told): `pairs.csv`, `clusters.csv` and
`summary.md`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from features.duplicates import (
    BLOCK_ROWS,
    DEFAULT_THRESHOLD,
    GroupAgreement,
    Pairs,
    clusters,
    exact_pairs,
    group_agreement,
    pair_similarity,
    store_near_pairs,
)
from features.splits import TEST, UNUSED, SplitError, SplitSpec, read_split, split_for
from features.store import FeatureStore

__all__ = [
    "Audit",
    "AuditError",
    "audit",
    "audit_lines",
    "default_out",
    "stored_splits",
    "summary_markdown",
    "write_audit",
]

SHOWN = 20
"""Clusters listed by name in summary.md per finding; the rest are in clusters.csv."""


LOW_PRECISION = 0.5
"""Below this precision against lesion groups, summary.md says that most near-duplicates are look-alikes."""


class AuditError(ValueError):
    """An audit that cannot run as asked: no embeddings, several backbones and none named, a threshold
    outside (0, 1]."""


@dataclass
class Audit:
    """What `audit` found in one store. Rows are store rows; `cluster` is 0 for a row in no cluster."""

    path: Path
    backbone: str
    threshold: float
    searched: np.ndarray
    """Store rows compared by embedding (those the backbone embedded)."""
    image_id: np.ndarray
    label: np.ndarray
    group: np.ndarray
    pairs: Pairs
    exact: np.ndarray
    """Per pair: the same file (SHA-256), else a near-duplicate by embedding only."""
    cluster: np.ndarray
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    split_note: str = ""
    """Why no split could be made, when none is stored and the default cannot be (e.g. no labels)."""
    agreement: GroupAgreement | None = None
    """Pairs of similarity >= threshold against lesion groups; None when no group holds two rows."""

    @property
    def clusters(self) -> int:
        return int(self.cluster.max()) if len(self.cluster) else 0

    def crossing(self, name: str) -> list[int]:
        """Clusters with members in the test part and in the study part of split `name`."""
        split = self.splits[name]
        kept = self.cluster > 0
        test = set(self.cluster[kept & (split == TEST)].tolist())
        study = set(self.cluster[kept & (split >= 0)].tolist())
        return sorted(test & study)

    def repeated_in_test(self, name: str) -> list[int]:
        """Clusters with two or more members in the test part of split `name` (and none in its study part):
        not a leak, but one image counted several times in the test figures, which narrows their
        intervals falsely."""
        split = self.splits[name]
        in_test = self.cluster[(self.cluster > 0) & (split == TEST)]
        counts = np.bincount(in_test, minlength=self.clusters + 1)
        return sorted(set(np.flatnonzero(counts >= 2).tolist()) - set(self.crossing(name)))

    def conflicts(self) -> list[int]:
        """Clusters whose members carry different labels (blank labels are not a label)."""
        labelled = (self.cluster > 0) & (self.label != "")
        seen: dict[int, set[str]] = {}
        for c, label in zip(self.cluster[labelled].tolist(), self.label[labelled].tolist()):
            seen.setdefault(c, set()).add(label)
        return sorted(c for c, labels in seen.items() if len(labels) > 1)


def stored_splits(store: FeatureStore) -> dict[str, np.ndarray]:
    """The splits the store holds (`/splits/<name>`, written by earlier versions), by name; else the
    default split that `fit` makes. SplitError when there is none and the default cannot be made."""
    with h5py.File(store.path, "r") as f:
        names = sorted(f["splits"]) if "splits" in f else []
    if not names:
        return {SplitSpec().name: split_for(store, SplitSpec())}
    return {name: read_split(store, name) for name in names}


def audit(
    path: str | Path,
    *,
    backbone: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    block_rows: int = BLOCK_ROWS,
) -> Audit:
    """Exact and near duplicates of the store at `path`, their clusters, and the splits to judge them on."""
    if not 0 < threshold <= 1:
        raise AuditError(f"threshold {threshold}: it takes a cosine similarity in (0, 1]")
    store = FeatureStore(path)
    backbone = store.pick_backbone(backbone)
    searched = np.flatnonzero(store.done(backbone))
    near = store_near_pairs(store, backbone, searched, threshold, block_rows=block_rows)
    same_i, same_j = exact_pairs(store.column("sha256"))
    n = len(store)
    known = {pair: k for k, pair in enumerate(zip(near.first.tolist(), near.second.tolist()))}
    only_exact = [k for k, pair in enumerate(zip(same_i.tolist(), same_j.tolist())) if pair not in known]
    is_exact = np.zeros(len(near), dtype=bool)
    is_exact[[known[p] for p in zip(same_i.tolist(), same_j.tolist()) if p in known]] = True
    # An exact pair below the threshold (or not embedded) still gets its similarity where both were embedded.
    ei, ej = same_i[only_exact], same_j[only_exact]
    embedded = np.isin(ei, searched) & np.isin(ej, searched)
    sims = np.full(len(ei), np.nan, dtype=np.float32)
    sims[embedded] = pair_similarity(store, backbone, ei[embedded], ej[embedded], block_rows=block_rows)
    first, second = np.concatenate([near.first, ei]), np.concatenate([near.second, ej])
    order = np.lexsort((second, first))
    pairs = Pairs(first[order], second[order], np.concatenate([near.similarity, sims])[order])
    exact = np.concatenate([is_exact, np.ones(len(ei), dtype=bool)])[order]
    groups = store.column("group")
    result = Audit(
        path=Path(path),
        backbone=backbone,
        threshold=threshold,
        searched=searched,
        image_id=store.column("image_id"),
        label=store.column("label"),
        group=groups,
        pairs=pairs,
        exact=exact,
        cluster=clusters(n, pairs.first, pairs.second),
    )
    try:
        result.splits = stored_splits(store)
    except SplitError as exc:
        result.split_note = str(exc)
    _, sizes = np.unique(groups[searched][groups[searched] != ""], return_counts=True)
    if len(sizes) and sizes.max() > 1:
        result.agreement = group_agreement(near, groups, searched)
    return result


def default_out(path: str | Path) -> Path:
    """`<store stem>-audit/` beside the store."""
    path = Path(path)
    return path.with_name(f"{path.stem}-audit")


def _side(value: int) -> str:
    return "test" if value == TEST else "unused" if value == UNUSED else "study"


def _pair_rows(result: Audit) -> list[list[str]]:
    rows = []
    for k in range(len(result.pairs)):
        i, j = int(result.pairs.first[k]), int(result.pairs.second[k])
        sim = result.pairs.similarity[k]
        gi, gj = result.group[i], result.group[j]
        crosses = [
            name
            for name, split in result.splits.items()
            if sorted([_side(int(split[i])), _side(int(split[j]))]) == ["study", "test"]
        ]
        rows.append(
            [
                result.image_id[i],
                result.image_id[j],
                "" if np.isnan(sim) else f"{sim:.4f}",
                "exact" if result.exact[k] else "near",
                "" if not gi or not gj else ("yes" if gi == gj else "no"),
                ";".join(crosses),
            ]
        )
    return rows


def _figure(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def summary_markdown(result: Audit) -> str:
    """summary.md: the counts, each split's crossing clusters, the label conflicts, and the agreement
    with lesion groups."""
    n_exact = int(result.exact.sum())
    members = np.bincount(result.cluster)[1:] if result.clusters else np.zeros(0, int)
    conflicts = result.conflicts()
    lines = [
        f"# Duplicate audit of `{result.path}`",
        "",
        f"Backbone `{result.backbone}`, near-duplicates: cosine similarity >= {result.threshold:g}; "
        f"{len(result.searched)} of {len(result.image_id)} rows compared by embedding"
        f"{' (the others were not embedded)' if len(result.searched) < len(result.image_id) else ''}, all rows by "
        "SHA-256.",
        "",
        "| finding | count |",
        "| --- | --- |",
        f"| exact duplicate pairs (same SHA-256) | {n_exact} |",
        f"| near-duplicate pairs (not exact) | {len(result.pairs) - n_exact} |",
        f"| clusters (2 or more rows, joined by either kind) | {result.clusters} ({int(members.sum())} rows) |",
    ]
    for name in result.splits:
        lines.append(f"| clusters crossing split `{name}` (test and study rows) | {len(result.crossing(name))} |")
        lines.append(f"| clusters repeated inside the test part of `{name}` | {len(result.repeated_in_test(name))} |")
    lines.append(f"| clusters with a label conflict | {len(conflicts)} |")
    lines.append("")
    if result.split_note:
        lines += [f"No split was judged: {result.split_note}", ""]
    agreement = result.agreement
    if agreement is None:
        lines += ["No lesion group holds two images: the pairs cannot be checked against groups.", ""]
    else:
        lines += [
            "Near-duplicate pairs (similarity >= threshold, exact ones included) against lesion groups: "
            f"precision {_figure(agreement.precision)} ({agreement.hits} of {agreement.pairs} pairs are one "
            f"lesion), recall {_figure(agreement.recall)} (of {agreement.group_pairs} pairs of images of one "
            "lesion).",
            "",
        ]
        if agreement.precision < LOW_PRECISION:
            lines[-2] += " Most flagged pairs are different lesions that look alike: consider a higher --threshold."
    for title, found in [
        *((f"Clusters crossing split `{name}`", result.crossing(name)) for name in result.splits),
        *(
            (f"Clusters repeated inside the test part of `{name}`", result.repeated_in_test(name))
            for name in result.splits
        ),
        ("Clusters with a label conflict", conflicts),
    ]:
        if found:
            lines += [f"## {title}", ""]
            for c in found[:SHOWN]:
                rows = np.flatnonzero(result.cluster == c)
                listed = ", ".join(f"{result.image_id[r]} ({result.label[r] or '?'})" for r in rows)
                lines.append(f"- cluster {c}: {listed}")
            if len(found) > SHOWN:
                lines.append(f"- ... {len(found) - SHOWN} more in clusters.csv")
            lines.append("")
    return "\n".join(lines)


def write_audit(result: Audit, out: str | Path) -> Path:
    """pairs.csv, clusters.csv and summary.md into the folder `out` (made if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_a", "image_b", "similarity", "kind", "same_group", "crosses_split"])
        writer.writerows(_pair_rows(result))
    with open(out / "clusters.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cluster", "image_id", "label", "group", "side"])
        for r in np.lexsort((np.arange(len(result.cluster)), result.cluster)):
            if result.cluster[r] > 0:
                side = ";".join(_side(int(split[r])) for split in result.splits.values())
                writer.writerow([int(result.cluster[r]), result.image_id[r], result.label[r], result.group[r], side])
    (out / "summary.md").write_text(summary_markdown(result))
    return out


def audit_lines(result: Audit, out: Path) -> list[str]:
    """The few lines the command prints."""
    n_exact = int(result.exact.sum())
    lines = [
        f"{result.path}: {n_exact} exact and {len(result.pairs) - n_exact} near-duplicate pairs "
        f"(cosine >= {result.threshold:g}, {result.backbone}), {result.clusters} clusters, "
        f"{len(result.conflicts())} with a label conflict",
    ]
    for name in result.splits:
        lines.append(
            f"  split {name}: {len(result.crossing(name))} clusters on both the test and the study side, "
            f"{len(result.repeated_in_test(name))} repeated inside the test part"
        )
    if result.split_note:
        lines.append(f"  no split judged: {result.split_note}")
    if result.agreement is not None:
        a = result.agreement
        lines.append(
            f"  against lesion groups: precision {_figure(a.precision)}, recall {_figure(a.recall)} "
            f"({a.hits} of {a.pairs} pairs one lesion, of {a.group_pairs})"
        )
    lines.append(f"wrote {out / 'pairs.csv'}, {out / 'clusters.csv'}, {out / 'summary.md'}")
    return lines
