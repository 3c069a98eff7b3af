"""Honest figures for a set of predictions: the ISIC headline (balanced accuracy), AUC, per-class
sensitivity and specificity, melanoma sensitivity at fixed specificity, calibration, lesion-grouped
bootstrap intervals and the majority-class baseline beside them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_curve

__all__ = [
    "BOOTSTRAP",
    "MALIGNANT",
    "PAUC_MIN_TPR",
    "SCREENING_SENSITIVITY",
    "WeightedRoc",
    "clinical_figures",
    "ECE_BINS",
    "MAX_CANDIDATES",
    "ResampledScores",
    "resample_weights",
    "POSITIVE_NAMES",
    "Reliability",
    "SPECIFICITIES",
    "balanced_offsets",
    "default_positive",
    "evaluate",
    "expected_calibration_error",
    "grouped_bootstrap",
    "macro_auc",
    "reliability_bins",
    "sensitivity_at_specificity",
    "shift_proba",
    "threshold_of",
]

POSITIVE_NAMES = ("mel", "melanoma")
"""A class with one of these names (any case) is the default positive class."""
SPECIFICITIES = (0.80, 0.90)
ECE_BINS = 15
BOOTSTRAP = 1000
SCREENING_SENSITIVITY = 0.95
"""Specificity is reported at this sensitivity (`spec_at_95_sens`), as clinical melanoma papers do."""
PAUC_MIN_TPR = 0.80
"""Partial AUC above this true-positive rate (`pauc_80`), as the ISIC 2024 challenge scores."""
MALIGNANT = ("mel", "bcc", "akiec", "scc")
"""HAM10000/ISIC diagnoses counted malignant in the malignant-vs-benign roll-up of multi-class runs."""
MAX_CANDIDATES = 512
"""Decision offsets (`balanced_offsets`) are searched over at most this many values per class."""


def default_positive(classes: list[str]) -> str | None:
    return next((c for c in classes if str(c).lower() in POSITIVE_NAMES), None)


def macro_auc(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> float:
    """Mean one-vs-rest AUC over the classes present with both outcomes (NaN if none)."""
    aucs = [_auc(y == c, proba[:, k]) for k, c in enumerate(classes)]
    aucs = [a for a in aucs if not np.isnan(a)]
    if len(classes) == 2:  # both one-vs-rest AUCs are the same number
        aucs = aucs[:1]
    return float(np.mean(aucs)) if aucs else float("nan")


def _auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), as roc_auc_score but without its
    input checks, which cost milliseconds a call inside a 1000-fold bootstrap."""
    truth = np.asarray(truth, dtype=bool)
    n_pos = int(truth.sum())
    n_neg = len(truth) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sensitivity_at_specificity(truth: np.ndarray, score: np.ndarray, specificity: float) -> float:
    """The best sensitivity among thresholds whose specificity is at least `specificity`."""
    if truth.all() or not truth.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(truth, score)
    return float(tpr[fpr <= 1 - specificity + 1e-12].max())


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins of top-label predictions, the non-empty ones in order: each bin's
    mean confidence, accuracy and number of rows."""

    confidence: np.ndarray
    accuracy: np.ndarray
    size: np.ndarray


def reliability_bins(correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """The binning behind both the ECE and the reliability diagram, so that the two always agree."""
    correct = np.asarray(correct, dtype=bool)
    confidence = np.asarray(confidence, dtype=float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    mean_confidence, accuracy, size = [], [], []
    for b in range(bins):
        inside = which == b
        if inside.any():
            mean_confidence.append(confidence[inside].mean())
            accuracy.append(correct[inside].mean())
            size.append(int(inside.sum()))
    return Reliability(
        np.array(mean_confidence, dtype=float), np.array(accuracy, dtype=float), np.array(size, dtype=int)
    )


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by its size."""
    binned = reliability_bins(correct, confidence, bins)
    total = 0.0
    for conf, acc, size in zip(binned.confidence, binned.accuracy, binned.size):
        total += size / len(confidence) * abs(acc - conf)
    return float(total)


def grouped_bootstrap(
    y: np.ndarray, proba: np.ndarray, classes: list[str], groups: np.ndarray, reps: int = BOOTSTRAP, seed: int = 0
) -> dict[str, list[float]]:
    """95 % intervals of balanced accuracy and AUC, resampling lesions (not images) with replacement.

    A resample draws each lesion some number of times; its rows are those of the drawn lesions, each
    as many times as its lesion was drawn. That is the same as weighting every row by its lesion's
    count, which is how it is computed (`ResampledScores`: 200,000 rows take seconds, not minutes). A
    resample that lacks a class of `y` is skipped."""
    scores = ResampledScores(y, proba, classes)
    ba, auc = [], []
    for weight in resample_weights(groups, reps, seed):
        figures = scores(weight)
        if figures is not None:
            ba.append(figures[0])
            auc.append(figures[1])
    return {
        "balanced_accuracy": [float(v) for v in np.nanpercentile(ba, [2.5, 97.5])] if ba else [],
        "auc": [float(v) for v in np.nanpercentile(auc, [2.5, 97.5])] if auc else [],
    }


class ResampledScores:
    """Balanced accuracy (of the argmax) and macro AUC of one set of predictions under any weighting of
    its rows: the scores are sorted once per class, and each weighting costs a few weighted sums, not a
    sort. The same weightings applied to two runs' predictions give a paired bootstrap."""

    def __init__(self, y: np.ndarray, proba: np.ndarray, classes: list[str]):
        y = np.asarray(y, dtype=object)
        self.present, self.y_code = np.unique(y, return_inverse=True)
        self.correct = np.array(classes, dtype=object)[proba.argmax(axis=1)] == y
        columns = range(1) if len(classes) == 2 else range(len(classes))  # binary: both AUCs are one number
        self.ranked = [_RankedScores(y == c, proba[:, k]) for k, c in enumerate(classes) if k in columns]

    def __call__(self, weight: np.ndarray) -> tuple[float, float] | None:
        """(balanced accuracy, AUC) under `weight`; None when a class of `y` has no weight."""
        total = np.bincount(self.y_code, weights=weight, minlength=len(self.present))
        if (total == 0).any():
            return None
        hits = np.bincount(self.y_code, weights=weight * self.correct, minlength=len(self.present))
        aucs = [a for a in (r.auc(weight) for r in self.ranked) if not np.isnan(a)]
        return float(np.mean(hits / total)), float(np.mean(aucs)) if aucs else float("nan")


class _RankedScores:
    """One class's one-vs-rest scores, sorted once, for the AUC of any row weighting (ties count half,
    as in the Mann-Whitney statistic of `_auc`)."""

    def __init__(self, truth: np.ndarray, score: np.ndarray):
        self.order = np.argsort(score, kind="stable")
        ordered = score[self.order]
        self.tie = np.concatenate([[0], np.cumsum(ordered[1:] != ordered[:-1])])
        self.truth = np.asarray(truth, dtype=bool)[self.order]

    def auc(self, weight: np.ndarray) -> float:
        w = weight[self.order]
        positive, negative = w * self.truth, w * ~self.truth
        pos_total, neg_total = positive.sum(), negative.sum()
        if pos_total == 0 or neg_total == 0:
            return float("nan")
        neg_per_tie = np.bincount(self.tie, weights=negative)
        below = np.cumsum(neg_per_tie) - neg_per_tie  # negatives scored strictly lower
        return float(np.sum(positive * (below[self.tie] + 0.5 * neg_per_tie[self.tie])) / (pos_total * neg_total))


class WeightedRoc:
    """The ROC curve of one score for any weighting of its rows (a lesion-grouped bootstrap resample is a
    weighting): the rows are sorted once, and each curve costs a few cumulative sums."""

    def __init__(self, truth: np.ndarray, score: np.ndarray):
        order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
        ordered = np.asarray(score, dtype=float)[order]
        self.order = order
        self.truth = np.asarray(truth, dtype=bool)[order]
        # the last row of each run of equal scores: where the curve has a point
        self.ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])

    def curve(self, weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr), from (0, 0) to (1, 1), one point per distinct score (as roc_curve without
        dropping collinear points); NaN arrays when a class has no weight."""
        w = np.ones(len(self.order)) if weight is None else np.asarray(weight, dtype=float)[self.order]
        tps = np.cumsum(w * self.truth)[self.ends]
        fps = np.cumsum(w * ~self.truth)[self.ends]
        if tps[-1] == 0 or fps[-1] == 0:
            return np.full(1, np.nan), np.full(1, np.nan)
        return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def spec_at_sens(fpr: np.ndarray, tpr: np.ndarray, sensitivity: float = SCREENING_SENSITIVITY) -> float:
    """The best specificity among the curve's thresholds whose sensitivity is at least `sensitivity`."""
    if np.isnan(tpr).any():
        return float("nan")
    return float(1 - fpr[tpr >= sensitivity - 1e-12].min())


def pauc_above_tpr(fpr: np.ndarray, tpr: np.ndarray, min_tpr: float = PAUC_MIN_TPR) -> float:
    """The partial AUC above true-positive rate `min_tpr` as ISIC 2024's scorer defines it (range 0 to
    1 - min_tpr): the area under the curve of the flipped problem (labels and scores reversed, so its
    false-positive rate is 1 - tpr) up to a false-positive rate of 1 - min_tpr, the last segment
    interpolated."""
    if np.isnan(tpr).any():
        return float("nan")
    # the flipped curve, in increasing order: fpr' = 1 - tpr, tpr' = 1 - fpr
    x, y = (1 - tpr)[::-1], (1 - fpr)[::-1]
    max_fpr = 1 - min_tpr
    stop = int(np.searchsorted(x, max_fpr, "right"))
    x_end = np.interp(max_fpr, x[stop - 1 : stop + 1], y[stop - 1 : stop + 1])
    xs, ys = np.r_[x[:stop], max_fpr], np.r_[y[:stop], x_end]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def _value(value: float, samples: list[float]) -> dict:
    """A figure and its 95 % interval from bootstrap samples (empty when no resample had it)."""
    kept = [v for v in samples if not np.isnan(v)]
    ci = [float(v) for v in np.percentile(kept, [2.5, 97.5])] if kept else []
    return {"value": float(value), "ci": ci}


def resample_weights(groups: np.ndarray, reps: int = BOOTSTRAP, seed: int = 0):
    """Row weights of `reps` lesion-grouped bootstrap resamples: each lesion drawn some number of times,
    its rows weighted by that count (the same resamples for the same groups and seed)."""
    rng = np.random.default_rng(seed)
    unique, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    for _ in range(reps):
        yield np.bincount(rng.integers(0, len(unique), len(unique)), minlength=len(unique))[index].astype(float)


def clinical_figures(
    truth: np.ndarray,
    score: np.ndarray,
    groups: np.ndarray,
    *,
    threshold: float | None = None,
    rule: str | None = None,
    seed: int = 0,
) -> dict:
    """The field's figures of one positive class (`truth`) and its probability (`score`), each with a
    lesion-grouped 95 % interval: specificity at 95 % sensitivity, partial AUC above 80 % TPR, and with a
    `threshold`, sensitivity and specificity at it (`operating_point`)."""
    truth = np.asarray(truth, dtype=bool)
    roc = WeightedRoc(truth, score)
    decided = np.asarray(score, dtype=float) >= (threshold if threshold is not None else np.inf)

    def figures(weight: np.ndarray | None) -> dict[str, float]:
        fpr, tpr = roc.curve(weight)
        w = np.ones(len(truth)) if weight is None else weight
        pos, neg = np.sum(w * truth), np.sum(w * ~truth)
        out = {"spec_at_95_sens": spec_at_sens(fpr, tpr), "pauc_80": pauc_above_tpr(fpr, tpr)}
        if threshold is not None:
            out["sensitivity"] = float(np.sum(w * truth * decided) / pos) if pos else float("nan")
            out["specificity"] = float(np.sum(w * ~truth * ~decided) / neg) if neg else float("nan")
        return out

    point = figures(None)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for weight in resample_weights(groups, seed=seed):
        for k, v in figures(weight).items():
            samples[k].append(v)
    result = {k: _value(point[k], samples[k]) for k in ("spec_at_95_sens", "pauc_80")}
    if threshold is not None:
        result["operating_point"] = {
            "rule": rule,
            "threshold": float(threshold),
            "sensitivity": _value(point["sensitivity"], samples["sensitivity"]),
            "specificity": _value(point["specificity"], samples["specificity"]),
        }
    return result


def evaluate(
    y: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    groups: np.ndarray,
    positive: str | None,
    majority: str,
    *,
    seed: int = 0,
    threshold: float | None = None,
    rule: str | None = None,
    malignant: tuple[str, ...] = MALIGNANT,
) -> dict:
    """Every figure of a report for labels `y` and probabilities `proba` (columns follow `classes`):
    the argmax figures, and for the positive class against the rest the field's figures
    (`clinical_figures`; at `threshold`, chosen by `rule`, when the run has an operating point). With
    more than two classes, of which some are `malignant`, the same for malignant against benign (the
    sum of the malignant classes' probabilities)."""
    y = np.asarray(y, dtype=object)
    classes = [str(c) for c in classes]
    predicted = np.array(classes, dtype=object)[proba.argmax(axis=1)]
    matrix = confusion_matrix(y, predicted, labels=classes)
    per_class = {}
    for k, c in enumerate(classes):
        tp, fn = matrix[k, k], matrix[k].sum() - matrix[k, k]
        fp = matrix[:, k].sum() - tp
        tn = matrix.sum() - tp - fn - fp
        per_class[c] = {
            "support": int(tp + fn),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
            "auc": _auc(y == c, proba[:, k]),
        }
    confidence = proba.max(axis=1)
    result = {
        "n": int(len(y)),
        "lesions": int(len(set(groups))),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        "accuracy": float(accuracy_score(y, predicted)),
        "auc": macro_auc(y, proba, classes),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": classes,
        "ece": expected_calibration_error(predicted == y, confidence),
        "ci95": grouped_bootstrap(y, proba, classes, groups, seed=seed),
        "baseline": {
            "class": majority,
            "balanced_accuracy": float(balanced_accuracy_score(y, np.full(len(y), majority, dtype=object))),
            "accuracy": float(np.mean(y == majority)),
            "auc": 0.5,
        },
    }
    if positive is not None and positive in classes:
        score = proba[:, classes.index(positive)]
        result["positive"] = positive
        result["sensitivity_at_specificity"] = {
            f"{s:.2f}": sensitivity_at_specificity(y == positive, score, s) for s in SPECIFICITIES
        }
        result.update(clinical_figures(y == positive, score, groups, threshold=threshold, rule=rule, seed=seed))
    bad = [c for c in classes if c.lower() in {m.lower() for m in malignant}]
    if len(classes) > 2 and 0 < len(bad) < len(classes):
        truth = np.isin(y, bad)
        score = proba[:, [classes.index(c) for c in bad]].sum(axis=1)
        result["malignant_vs_benign"] = {
            "malignant": bad,
            "auc": _auc(truth, score),
            **clinical_figures(truth, score, groups, seed=seed),
        }
    return result


def _ratio(a: int, b: int) -> float:
    return float(a / b) if b else float("nan")


def balanced_offsets(codes: np.ndarray, proba: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Per-class offsets b of the log-probabilities whose decision argmax(log p + b) has the highest
    balanced accuracy on these rows (codes: each row's class index; columns of `proba` follow them).

    Why: a network's scores move as training goes on, so the argmax's operating point drifts even while
    the ranking (AUC) improves; the rule is set once the model is chosen, on the rows that chose it.
    Two classes: the exact best threshold (as an offset of the second class; among equally good ones the
    nearest to the argmax). More: a few rounds of coordinate search over the candidates each class's
    scores give (exact up to MAX_CANDIDATES rows). Classes absent from the rows keep offset 0."""
    codes = np.asarray(codes)
    k = proba.shape[1]
    logp = np.log(np.clip(proba, 1e-12, 1.0))
    offsets = np.zeros(k)
    present = np.unique(codes)
    if len(present) < 2:
        return offsets

    def score(b: np.ndarray) -> float:
        predicted = np.argmax(logp + b, axis=1)
        return float(np.mean([np.mean(predicted[codes == c] == c) for c in present]))

    for _ in range(rounds if k > 2 else 1):
        for j in range(1, k):
            others = np.delete(logp + offsets, j, axis=1).max(axis=1)
            margins = np.unique(others - logp[:, j])  # offset at which each row flips to or from class j
            if len(margins) > MAX_CANDIDATES:  # large validation sets: quantiles of them
                margins = np.unique(np.quantile(margins, np.linspace(0, 1, MAX_CANDIDATES)))
            candidates = np.concatenate(
                [[offsets[j]], (margins[:-1] + margins[1:]) / 2, margins[:1] - 1e-6, margins[-1:] + 1e-6]
            )
            results = []
            for c in candidates:
                trial = offsets.copy()
                trial[j] = c
                results.append((score(trial), -abs(c), c))
            offsets[j] = max(results)[2]
    return offsets


def shift_proba(proba: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Probabilities whose argmax is the offset decision: softmax(log p + b)."""
    z = np.log(np.clip(proba, 1e-12, 1.0)) + offsets
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def threshold_of(offsets: np.ndarray) -> float:
    """Two classes: the probability of the second class above which it is decided, for these offsets
    (p1 / p0 > exp(-(b1 - b0)))."""
    ratio = float(np.exp(-(offsets[1] - offsets[0])))
    return ratio / (1 + ratio)
