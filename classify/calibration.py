"""Whether a run's probabilities mean what they say: a calibration map fitted on the out-of-fold
predictions of the study rows (never on test rows), kept in the run as plain numbers (no pickle) and
applied to every probability the run gives afterwards (its test predictions, `predict`, `evaluate`).

- `temperature` (the default): one number T, probabilities softmax(log p / T), T chosen to minimise the
  log-loss of the out-of-fold predictions (Guo et al. 2017). It keeps every row's ranking of the
  classes, so the argmax and (for two classes) the AUC are unchanged; it only stretches or shrinks the
  confidence, which is what most heads get wrong (boosted trees and MLPs are overconfident). Where that
  T would leave the expected calibration error of those rows worse than without it, T stays 1.
- `isotonic`: a monotone step map per class (one against the rest; rows renormalised when there are
  more than two classes), as scikit-learn's IsotonicRegression fits it: more flexible, needs more rows,
  and makes ties of nearby scores.
- `none`: probabilities as the head gives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CALIBRATIONS", "Calibration", "brier_score", "fit_calibration", "top_label_ece"]

CALIBRATIONS = ("none", "temperature", "isotonic")
EPS = 1e-12


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration map: its method and its numbers (`as_dict` / `from_dict` round-trip JSON)."""

    method: str = "none"
    temperature: float = 1.0
    steps: list[tuple[list[float], list[float]]] = field(default_factory=list)
    """isotonic: per class, the (x, y) knots of its monotone map (interpolated linearly between them, as
    scikit-learn predicts)."""

    def apply(self, proba: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (rows sum to 1; columns as given)."""
        proba = np.asarray(proba, dtype=float)
        if self.method == "temperature":
            z = np.log(np.clip(proba, EPS, 1.0)) / self.temperature
            z -= z.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        if self.method == "isotonic":
            if proba.shape[1] == 2:  # one map, for the second class; the first is its complement
                x, y = self.steps[0]
                p = np.interp(proba[:, 1], x, y)
                return np.column_stack([1 - p, p])
            out = np.column_stack([np.interp(proba[:, k], x, y) for k, (x, y) in enumerate(self.steps)])
            total = out.sum(axis=1, keepdims=True)
            # a row every map sends to 0 keeps the head's own probabilities rather than dividing by 0
            return np.where(total > 0, out / np.where(total > 0, total, 1), proba)
        return proba

    def as_dict(self) -> dict:
        values: dict = {"method": self.method}
        if self.method == "temperature":
            values["temperature"] = self.temperature
        if self.method == "isotonic":
            values["steps"] = [{"x": list(x), "y": list(y)} for x, y in self.steps]
        return values

    @classmethod
    def from_dict(cls, values: dict | None) -> Calibration:
        """A calibration as `as_dict` wrote it; None (a run made before calibration existed): none."""
        if not values:
            return cls()
        if values.get("method") not in CALIBRATIONS:
            raise ValueError(f"calibration method {values.get('method')!r}: not one of {', '.join(CALIBRATIONS)}")
        steps = [([float(v) for v in s["x"]], [float(v) for v in s["y"]]) for s in values.get("steps", [])]
        return cls(values["method"], float(values.get("temperature", 1.0)), steps)


def top_label_ece(codes: np.ndarray, proba: np.ndarray) -> float:
    """The top-label ECE of rows whose true class index is `codes` (metrics' binning)."""
    from classify.metrics import expected_calibration_error

    return expected_calibration_error(proba.argmax(axis=1) == codes, proba.max(axis=1))


def _log_loss(codes: np.ndarray, proba: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(codes)), codes], EPS, 1.0))))


def fit_calibration(method: str, codes: np.ndarray, proba: np.ndarray) -> Calibration:
    """The `method` map fitted on rows whose true class index is `codes` and whose (out-of-fold)
    probabilities are `proba`."""
    if method not in CALIBRATIONS:
        raise ValueError(f"--calibrate {method!r}: choose {', '.join(CALIBRATIONS)}")
    codes = np.asarray(codes)
    proba = np.asarray(proba, dtype=float)
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        def loss(log_t: float) -> float:
            return _log_loss(codes, Calibration("temperature", float(np.exp(log_t))).apply(proba))

        # T from 1/20 to 20: beyond that the head is degenerate, and the search must stay bounded
        found = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
        fitted = Calibration("temperature", float(np.exp(found.x)))
        # The log-loss's T can still leave the binned calibration error worse on these very rows (a
        # head whose errors are not a matter of scale); then it is not applied (T = 1).
        better = top_label_ece(codes, fitted.apply(proba)) <= top_label_ece(codes, proba)
        return fitted if better else Calibration("temperature")
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        columns = [1] if proba.shape[1] == 2 else range(proba.shape[1])
        steps = []
        for k in columns:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(proba[:, k], codes == k)
            steps.append(([float(v) for v in iso.X_thresholds_], [float(v) for v in iso.y_thresholds_]))
        return Calibration("isotonic", steps=steps)
    return Calibration()


def brier_score(codes: np.ndarray, proba: np.ndarray) -> float:
    """Brier's score: the mean squared distance between the probabilities and the one-hot truth, summed
    over the classes (Brier 1950); for two classes the usual binary form, half that sum."""
    onehot = np.zeros_like(proba, dtype=float)
    onehot[np.arange(len(codes)), codes] = 1.0
    total = float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))
    return total / 2 if proba.shape[1] == 2 else total
