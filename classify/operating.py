"""The operating point: the threshold on the positive class's probability at which a run decides, chosen
beforehand on the out-of-fold predictions of the study rows (never on test rows), kept in the run, and
applied by `predict` and `evaluate`. A clinical paper reports sensitivity and specificity at such a
fixed threshold; on the test rows they will not hit the target exactly, which is the honest figure.

Rules (`fit --operating-point`):

- `sens=S`: the highest threshold whose out-of-fold sensitivity is at least S (screening: S = 0.95);
- `spec=S`: the lowest threshold whose out-of-fold specificity is at least S;
- `youden`: the threshold of the largest sensitivity + specificity - 1.

The decision: the positive class when its probability is at least the threshold, else the most
probable of the other classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_RULE", "OperatingPoint", "choose_threshold", "decide", "parse_rule"]

DEFAULT_RULE = "sens=0.95"
"""The default rule where there is a positive class: specificity at 95 % sensitivity is what clinical
melanoma papers report."""


def parse_rule(text: str) -> str:
    """`text` as a rule (`sens=0.95`, `spec=0.9`, `youden`; `none` for no operating point), or ValueError
    saying how to write one."""
    text = text.strip().lower()
    if text in ("youden", "none"):
        return text
    kind, _, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = math.nan
    if kind not in ("sens", "spec") or not 0 < target < 1:
        raise ValueError(f"--operating-point {text!r}: write sens=S or spec=S with S between 0 and 1, or youden")
    return f"{kind}={target:g}"


def choose_threshold(rule: str, truth: np.ndarray, score: np.ndarray) -> float:
    """The threshold of `rule` on these rows (`truth`: the positive class; `score`: its probability).
    A row is decided positive when its score is at least the threshold."""
    truth = np.asarray(truth, dtype=bool)
    score = np.asarray(score, dtype=float)
    positives, negatives = np.sort(score[truth])[::-1], np.sort(score[~truth])
    if not len(positives) or not len(negatives):
        raise ValueError("an operating point needs rows of the positive class and of the others")
    if rule == "youden":
        from sklearn.metrics import roc_curve

        fpr, tpr, thresholds = roc_curve(truth, score)  # each threshold: decided positive at score >= it
        best = int(np.argmax(tpr - fpr))
        return float(min(thresholds[best], 1.0))  # (roc_curve's first threshold is +inf: none positive)
    kind, target = rule.split("=")
    if kind == "sens":  # the k-th highest positive score, k the fewest positives that reach the target
        k = math.ceil(float(target) * len(positives) - 1e-9)
        return float(positives[max(k, 1) - 1])
    # spec: just above the m-th lowest negative score, halfway to the next higher score of any row
    m = math.ceil(float(target) * len(negatives) - 1e-9)
    edge = negatives[max(m, 1) - 1]
    above = score[score > edge]
    return float((edge + above.min()) / 2) if len(above) else float(np.nextafter(edge, np.inf))


def decide(proba: np.ndarray, classes: list[str], positive: str, threshold: float) -> np.ndarray:
    """Each row's decided class: `positive` when its probability is at least `threshold`, else the most
    probable of the others."""
    k = classes.index(positive)
    others = proba.copy()
    others[:, k] = -np.inf
    decided = np.array(classes, dtype=object)[others.argmax(axis=1)]
    decided[proba[:, k] >= threshold] = positive
    return decided


@dataclass(frozen=True)
class OperatingPoint:
    """A run's operating point: the rule it was chosen by, the positive class, the threshold."""

    rule: str
    positive: str
    threshold: float

    def decide(self, proba: np.ndarray, classes: list[str]) -> np.ndarray:
        return decide(proba, classes, self.positive, self.threshold)

    def as_dict(self) -> dict:
        return {"rule": self.rule, "positive": self.positive, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, values: dict | None) -> OperatingPoint | None:
        if not values:
            return None
        return cls(str(values["rule"]), str(values["positive"]), float(values["threshold"]))
