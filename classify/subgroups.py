"""How a run does for each skin type, sex, age band or body site (`fit --subgroups`, `evaluate
--subgroups`): the same figures per group of a metadata column, each with lesion-grouped intervals,
and the widest gap in sensitivity at the operating point. A model can look fine on average and fail
one group (on the DDI set a HAM10000-trained model fell from AUC 0.72 on Fitzpatrick I-II to 0.57 on
V-VI), and only a minority of published studies report it.

Groups: a column's values as they are; ages in the bands <30, 30-49, 50-69, >=70; other numbers with
many values in quartiles of the scored rows; a blank value is a group of its own (`missing`). A group
with fewer than MIN_LESIONS lesions of some class is "too few to judge": its size is given, its
figures are not (an interval over a handful of lesions says nothing).
"""

from __future__ import annotations

import numpy as np

from classify.metrics import evaluate

__all__ = ["AGE_COLUMNS", "MIN_LESIONS", "MISSING", "bin_values", "subgroup_figures", "worst_gap"]

MIN_LESIONS = 10
"""Fewer lesions of a class than this in a group: too few to judge."""
MISSING = "missing"
AGE_COLUMNS = ("age", "age_approx")
AGE_BANDS = ((30, "<30"), (50, "30-49"), (70, "50-69"), (np.inf, ">=70"))
MAX_CATEGORIES = 12
"""A numeric column with more distinct values than this is binned into quartiles."""


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return np.nan


def bin_values(column: str, values: np.ndarray) -> np.ndarray:
    """Each row's group label in `column`."""
    text = np.array([str(v).strip() for v in values], dtype=object)
    blank = np.isin(text, ["", "nan", "NaN", "None", "unknown"])
    numbers = np.array([_number(v) for v in text])
    numeric = ~blank & ~np.isnan(numbers)
    out = text.copy()
    out[blank] = MISSING
    if numeric.any() and numeric.sum() == (~blank).sum():  # every filled value is a number
        if column.lower() in AGE_COLUMNS:
            for row in np.flatnonzero(numeric):
                out[row] = next(label for upper, label in AGE_BANDS if numbers[row] < upper)
        elif len(np.unique(numbers[numeric])) > MAX_CATEGORIES:
            edges = np.quantile(numbers[numeric], [0.25, 0.5, 0.75])
            names = [f"<{edges[0]:g}", f"{edges[0]:g}-{edges[1]:g}", f"{edges[1]:g}-{edges[2]:g}", f">={edges[2]:g}"]
            for row in np.flatnonzero(numeric):
                out[row] = names[int(np.searchsorted(edges, numbers[row], side="right"))]
    return out


def _order(label: str) -> tuple:
    """Groups in a readable order: age bands and numbers ascending, `missing` last."""
    bands = [b for _, b in AGE_BANDS]
    if label == MISSING:
        return (2, 0, label)
    if label in bands:
        return (0, bands.index(label), label)
    number = _number(label.lstrip("<>="))
    return (0, number, label) if not np.isnan(number) else (1, 0, label)


def subgroup_figures(
    meta: dict[str, np.ndarray],
    y: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    groups: np.ndarray,
    *,
    positive: str | None,
    threshold: float | None = None,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Per metadata column (`meta`: column -> values of these rows), per group: images, lesions, the
    positive rate, AUC, balanced accuracy, and sensitivity and specificity at `threshold`, each figure
    {value, ci}; None where the group is too few to judge."""
    y = np.asarray(y, dtype=object)
    groups = np.asarray(groups, dtype=object)
    result: dict[str, list[dict]] = {}
    for column, values in meta.items():
        labels = bin_values(column, values)
        rows = []
        for label in sorted(set(labels), key=_order):
            inside = labels == label
            lesions = {c: len(set(groups[inside & (y == c)])) for c in classes}
            entry: dict = {
                "group": str(label),
                "images": int(inside.sum()),
                "lesions": int(len(set(groups[inside]))),
                "positive_rate": float(np.mean(y[inside] == positive)) if positive else None,
                "judged": min(lesions.values()) >= MIN_LESIONS,
            }
            figures = {"auc": None, "balanced_accuracy": None, "sensitivity": None, "specificity": None}
            if entry["judged"]:
                majority = max(classes, key=lambda c: (np.sum(y[inside] == c), c))
                scored = (y[inside], proba[inside], classes, groups[inside], positive, majority)
                m = evaluate(*scored, seed=seed, threshold=threshold)
                for key in ("auc", "balanced_accuracy"):
                    figures[key] = {"value": m[key], "ci": m["ci95"][key]}
                if "operating_point" in m:
                    figures["sensitivity"] = m["operating_point"]["sensitivity"]
                    figures["specificity"] = m["operating_point"]["specificity"]
            rows.append({**entry, **figures})
        result[column] = rows
    return result


def worst_gap(rows: list[dict]) -> dict | None:
    """The judged groups of lowest and highest sensitivity at the operating point, and the gap."""
    judged = [r for r in rows if r["judged"] and r["sensitivity"] is not None]
    if len(judged) < 2:
        return None
    ranked = sorted(judged, key=lambda r: r["sensitivity"]["value"])  # stable: equal ones keep their order
    low, high = ranked[0], ranked[-1]
    return {
        "lowest": low["group"],
        "highest": high["group"],
        "gap": high["sensitivity"]["value"] - low["sensitivity"]["value"],
    }
