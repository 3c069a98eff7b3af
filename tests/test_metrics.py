"""classify/metrics.py: hand-checked confusion figures, AUC, sensitivity at specificity, ECE, lesion bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from classify.metrics import (
    default_positive,
    evaluate,
    expected_calibration_error,
    grouped_bootstrap,
    macro_auc,
    reliability_bins,
    sensitivity_at_specificity,
)


def confident(predicted, classes, top=0.6):
    """Probabilities whose argmax is `predicted`: `top` there, the rest shared equally."""
    proba = np.full((len(predicted), len(classes)), (1 - top) / (len(classes) - 1))
    proba[np.arange(len(predicted)), [classes.index(p) for p in predicted]] = top
    return proba


# true / predicted, 14 images, 3 classes; by hand, rows true (bcc, mel, nv), columns predicted:
#   bcc: [2, 1, 0]    mel: [0, 3, 2]    nv: [1, 0, 5]     (not symmetric: a transpose shows)
TRUE = ["bcc"] * 3 + ["mel"] * 5 + ["nv"] * 6
PRED = ["bcc", "bcc", "mel"] + ["mel", "mel", "mel", "nv", "nv"] + ["nv"] * 5 + ["bcc"]
CLASSES = ["bcc", "mel", "nv"]


def hand_example(classes=CLASSES):
    order = np.random.default_rng(0).permutation(len(TRUE))  # rows in no particular order
    y = np.array(TRUE, dtype=object)[order]
    proba = confident(list(np.array(PRED, dtype=object)[order]), classes)
    return y, proba, np.array([f"L{i}" for i in range(len(y))])


def test_confusion_figures_match_the_hand_computation():
    y, proba, groups = hand_example()
    r = evaluate(y, proba, CLASSES, groups, positive="mel", majority="nv")
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 3, 2], [1, 0, 5]]
    assert r["accuracy"] == pytest.approx(10 / 14)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5 + 5 / 6) / 3)
    pc = r["per_class"]
    assert [pc[c]["support"] for c in CLASSES] == [3, 5, 6]
    # sensitivity tp/(tp+fn), specificity tn/(tn+fp), precision tp/(tp+fp)
    assert pc["bcc"]["sensitivity"] == pytest.approx(2 / 3)
    assert pc["mel"]["sensitivity"] == pytest.approx(3 / 5)
    assert pc["nv"]["sensitivity"] == pytest.approx(5 / 6)
    assert pc["bcc"]["specificity"] == pytest.approx(10 / 11)  # of 11 non-bcc, one nv called bcc
    assert pc["mel"]["specificity"] == pytest.approx(8 / 9)  # of 9 non-mel, one bcc called mel
    assert pc["nv"]["specificity"] == pytest.approx(6 / 8)  # of 8 non-nv, two mel called nv
    assert pc["bcc"]["precision"] == pytest.approx(2 / 3)
    assert pc["mel"]["precision"] == pytest.approx(3 / 4)
    assert pc["nv"]["precision"] == pytest.approx(5 / 7)
    assert r["n"] == 14 and r["lesions"] == 14 and r["classes"] == CLASSES
    assert r["positive"] == "mel"
    assert set(r["sensitivity_at_specificity"]) == {"0.80", "0.90"}


def test_confusion_matrix_follows_the_given_class_order():
    order = ["nv", "mel", "bcc"]
    y, proba, groups = hand_example(order)  # columns in this order
    r = evaluate(y, proba, order, groups, positive=None, majority="nv")
    assert r["confusion_matrix"] == [[5, 0, 1], [2, 3, 0], [0, 1, 2]]
    assert r["per_class"]["mel"]["specificity"] == pytest.approx(8 / 9)
    assert r["per_class"]["nv"]["precision"] == pytest.approx(5 / 7)
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 5 + 5 / 6) / 3)
    assert "positive" not in r and "sensitivity_at_specificity" not in r


def test_a_class_without_rows_keeps_its_row_and_column():
    classes = ["bcc", "df", "mel", "nv"]
    y, proba, groups = hand_example()
    proba = np.insert(proba, 1, 0.0, axis=1)  # a 'df' column that is never chosen
    r = evaluate(y, proba, classes, groups, positive="melanoma", majority="nv")
    m = np.array(r["confusion_matrix"])
    assert m.shape == (4, 4) and m[1].sum() == 0 and m[:, 1].sum() == 0
    assert r["per_class"]["df"]["support"] == 0 and np.isnan(r["per_class"]["df"]["sensitivity"])
    assert np.isnan(r["per_class"]["df"]["auc"])
    assert "positive" not in r  # 'melanoma' is not one of the classes


def test_sensitivity_at_specificity_hand_example():
    truth = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.75, 0.35, 0.5, 0.6, 0.7, 0.8])
    # no false positive (spec 1.0): only 0.8 is above 0.75 -> 1/5
    assert sensitivity_at_specificity(truth, score, 0.90) == pytest.approx(0.2)
    assert sensitivity_at_specificity(truth, score, 1.00) == pytest.approx(0.2)
    # one false positive allowed (spec 0.8, exactly reachable): threshold above 0.4 -> 4/5
    assert sensitivity_at_specificity(truth, score, 0.80) == pytest.approx(0.8)
    # two allowed (spec 0.6): threshold above 0.3 -> all five
    assert sensitivity_at_specificity(truth, score, 0.60) == pytest.approx(1.0)
    assert np.isnan(sensitivity_at_specificity(np.ones(4, bool), np.arange(4.0), 0.8))
    assert np.isnan(sensitivity_at_specificity(np.zeros(4, bool), np.arange(4.0), 0.8))


def test_evaluate_reports_sensitivity_at_specificity_of_the_positive_column():
    y = np.array(["nv"] * 5 + ["mel"] * 5, dtype=object)
    mel = np.array([0.1, 0.2, 0.3, 0.4, 0.75, 0.35, 0.5, 0.6, 0.7, 0.8])
    proba = np.column_stack([mel, 1 - mel])  # classes mel, nv
    r = evaluate(y, proba, ["mel", "nv"], np.arange(10), positive="mel", majority="nv")
    assert r["sensitivity_at_specificity"] == {"0.80": pytest.approx(0.8), "0.90": pytest.approx(0.2)}


def test_ece_of_toys_with_known_answers():
    correct = np.array([1] * 8 + [0] * 2, dtype=bool)
    assert expected_calibration_error(correct, np.full(10, 0.8)) == pytest.approx(0.0, abs=1e-9)
    half = np.array([1, 0] * 5, dtype=bool)
    assert expected_calibration_error(half, np.full(10, 1.0)) == pytest.approx(0.5)
    assert expected_calibration_error(np.ones(10, bool), np.full(10, 1.0)) == pytest.approx(0.0)


def test_ece_weights_bins_by_size_and_averages_within_a_bin():
    # 2 rows at 0.9, both wrong (gap 0.9); 6 rows at 0.3, all right (gap 0.7): 2/8*0.9 + 6/8*0.7
    correct = np.array([0, 0] + [1] * 6, dtype=bool)
    confidence = np.array([0.9, 0.9] + [0.3] * 6)
    assert expected_calibration_error(correct, confidence) == pytest.approx(0.75)
    # one bin (0.80..0.87 of 15): accuracy 0.5 against mean confidence 0.83, not per-row gaps
    assert expected_calibration_error(np.array([1, 0], bool), np.array([0.81, 0.85])) == pytest.approx(0.33)
    # with one bin the whole set is compared at once
    assert expected_calibration_error(correct, confidence, bins=1) == pytest.approx(abs(0.75 - 0.45))


def test_reliability_bins_are_the_bins_the_ece_weighs():
    # the example above: bin of 0.9 (2 rows, accuracy 0) and bin of 0.3 (6 rows, accuracy 1), in order
    correct = np.array([0, 0] + [1] * 6, dtype=bool)
    confidence = np.array([0.9, 0.9] + [0.3] * 6)
    binned = reliability_bins(correct, confidence)
    assert binned.confidence.tolist() == pytest.approx([0.3, 0.9])
    assert binned.accuracy.tolist() == [1.0, 0.0] and binned.size.tolist() == [6, 2]
    gaps = np.abs(binned.accuracy - binned.confidence)
    assert expected_calibration_error(correct, confidence) == pytest.approx(np.sum(binned.size / 8 * gaps))
    # edges: 0 and 1 fall in the first and last bins; empty bins are left out
    edge = reliability_bins(np.array([1, 1], bool), np.array([0.0, 1.0]), bins=4)
    assert edge.size.tolist() == [1, 1] and edge.confidence.tolist() == [0.0, 1.0]


def test_evaluate_ece_uses_top_label_confidence():
    # 10 rows 'b' at 0.9, right 8 times (gap 0.1); 10 rows 'a' at 0.7, right 7 times (gap 0)
    y = np.array(["b"] * 8 + ["a"] * 2 + ["a"] * 7 + ["b"] * 3, dtype=object)
    proba = np.array([[0.1, 0.9]] * 10 + [[0.7, 0.3]] * 10)
    r = evaluate(y, proba, ["a", "b"], np.arange(20), positive=None, majority="a")
    assert r["ece"] == pytest.approx(0.05)


def test_auc_of_perfect_and_reversed_scores():
    y = np.array(["a", "b", "c"] * 6, dtype=object)
    onehot = confident(list(y), ["a", "b", "c"], top=0.9)
    assert macro_auc(y, onehot, ["a", "b", "c"]) == pytest.approx(1.0)
    reversed_ = (1 - onehot) / (1 - onehot).sum(axis=1, keepdims=True)
    assert macro_auc(y, reversed_, ["a", "b", "c"]) == pytest.approx(0.0)
    yb = y[y != "c"]
    pb = confident(list(yb), ["a", "b"], top=0.7)
    assert macro_auc(yb, pb, ["a", "b"]) == pytest.approx(1.0)
    assert macro_auc(yb, pb[:, ::-1], ["a", "b"]) == pytest.approx(0.0)


def test_binary_macro_auc_is_the_auc_of_the_second_class():
    rng = np.random.default_rng(0)
    y = np.array(["mel", "nv"], dtype=object)[(rng.random(80) < 0.3).astype(int)]
    nv = np.clip(rng.random(80) * 0.6 + (y == "nv") * 0.3, 0, 1)
    proba = np.column_stack([1 - nv, nv])
    expected = roc_auc_score(y == "nv", nv)
    assert 0.6 < expected < 0.99  # an informative, imperfect score
    assert macro_auc(y, proba, ["mel", "nv"]) == pytest.approx(expected)
    r = evaluate(y, proba, ["mel", "nv"], np.arange(80), positive="mel", majority="nv")
    assert r["auc"] == pytest.approx(expected)
    assert r["per_class"]["nv"]["auc"] == pytest.approx(expected)
    assert r["per_class"]["mel"]["auc"] == pytest.approx(expected)


def test_multiclass_macro_auc_is_the_mean_one_vs_rest_auc():
    rng = np.random.default_rng(1)
    classes = ["bcc", "mel", "nv"]
    y = np.array(classes, dtype=object)[rng.integers(0, 3, 120)]
    logits = rng.normal(0, 1, (120, 3)) + 1.2 * (y[:, None] == np.array(classes)[None, :])
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)
    assert macro_auc(y, proba, classes) == pytest.approx(expected)
    # a class with no rows is left out of the mean
    keep = y != "bcc"
    assert macro_auc(y[keep], proba[keep], classes) == pytest.approx(
        np.mean([roc_auc_score(y[keep] == c, proba[keep, k]) for k, c in enumerate(classes) if c != "bcc"])
    )


def noisy_problem(lesions, per_lesion=1, seed=0):
    """Binary predictions, right ~75 % of the time, `per_lesion` identical images per lesion."""
    rng = np.random.default_rng(seed)
    y = np.array(["mel", "nv"], dtype=object)[rng.integers(0, 2, lesions)]
    nv = np.clip((y == "nv") * 0.25 + rng.random(lesions) * 0.75, 0, 1)
    proba = np.column_stack([1 - nv, nv])
    groups = np.array([f"L{i:04d}" for i in range(lesions)])
    return np.repeat(y, per_lesion), np.repeat(proba, per_lesion, axis=0), np.repeat(groups, per_lesion)


def width(interval):
    return interval[1] - interval[0]


def test_ci95_contains_the_estimate_and_narrows_with_more_lesions():
    y, proba, groups = noisy_problem(300, seed=2)
    r = evaluate(y, proba, ["mel", "nv"], groups, positive="mel", majority="nv", seed=0)
    for key in ("balanced_accuracy", "auc"):
        lo, hi = r["ci95"][key]
        assert lo < r[key] < hi, key
        assert 0.0 <= lo and hi <= 1.0
    few = grouped_bootstrap(*noisy_problem(30, seed=3)[:2], ["mel", "nv"], noisy_problem(30, seed=3)[2], reps=300)
    many = grouped_bootstrap(*noisy_problem(600, seed=3)[:2], ["mel", "nv"], noisy_problem(600, seed=3)[2], reps=300)
    for key in ("balanced_accuracy", "auc"):
        assert width(many[key]) < 0.5 * width(few[key]), key


def reference_interval(y, proba, classes, groups, reps=2000, seed=123):
    """An independent binary lesion bootstrap, by weights: a resampled lesion drawn m times weighs m.
    Returns the 2.5 / 97.5 percentiles of balanced accuracy and AUC (Mann-Whitney with weights)."""
    rng = np.random.default_rng(seed)
    lesions, index = np.unique(groups, return_inverse=True)
    pos = y == classes[1]
    correct = np.array(classes, dtype=object)[proba.argmax(1)] == y
    s = proba[:, 1]
    wins = (s[pos][:, None] > s[~pos][None, :]) + 0.5 * (s[pos][:, None] == s[~pos][None, :])
    ba, auc = [], []
    for _ in range(reps):
        w = rng.multinomial(len(lesions), np.full(len(lesions), 1 / len(lesions)))[index].astype(float)
        wp, wn = w[pos], w[~pos]
        ba.append(((wp * correct[pos]).sum() / wp.sum() + (wn * correct[~pos]).sum() / wn.sum()) / 2)
        auc.append(wp @ wins @ wn / (wp.sum() * wn.sum()))
    return {"balanced_accuracy": np.percentile(ba, [2.5, 97.5]), "auc": np.percentile(auc, [2.5, 97.5])}


def test_ci95_matches_an_independent_lesion_bootstrap():
    y, proba, groups = noisy_problem(150, per_lesion=2, seed=6)
    got = grouped_bootstrap(y, proba, ["mel", "nv"], groups, reps=1000, seed=0)
    want = reference_interval(y, proba, ["mel", "nv"], groups)
    for key in ("balanced_accuracy", "auc"):
        assert got[key] == pytest.approx(want[key], abs=0.015), key


def test_evaluate_ci95_is_the_lesion_bootstrap_with_its_seed():
    y, proba, groups = noisy_problem(40, per_lesion=3, seed=7)
    r = evaluate(y, proba, ["mel", "nv"], groups, positive="mel", majority="nv", seed=5)
    assert r["lesions"] == 40 and r["n"] == 120
    expected = grouped_bootstrap(y, proba, ["mel", "nv"], groups, seed=5)
    for key in ("balanced_accuracy", "auc"):
        assert r["ci95"][key] == pytest.approx(expected[key]), key


def test_bootstrap_resamples_lesions_not_images():
    # 40 lesions of 10 identical images each; the same 400 images counted as 400 lesions
    y, proba, groups = noisy_problem(40, per_lesion=10, seed=4)
    by_lesion = grouped_bootstrap(y, proba, ["mel", "nv"], groups, reps=300, seed=1)
    by_image = grouped_bootstrap(y, proba, ["mel", "nv"], np.arange(len(y)), reps=300, seed=1)
    for key in ("balanced_accuracy", "auc"):
        assert width(by_lesion[key]) > 2 * width(by_image[key]), key
    # resampling whole lesions, 10 copies of a lesion weigh exactly as one image does
    y1, p1, g1 = noisy_problem(40, per_lesion=1, seed=4)
    single = grouped_bootstrap(y1, p1, ["mel", "nv"], g1, reps=300, seed=1)
    for key in ("balanced_accuracy", "auc"):
        assert single[key] == pytest.approx(by_lesion[key]), key


def test_bootstrap_is_seeded():
    y, proba, groups = noisy_problem(50, per_lesion=2, seed=5)
    a = grouped_bootstrap(y, proba, ["mel", "nv"], groups, reps=200, seed=7)
    b = grouped_bootstrap(y, proba, ["mel", "nv"], groups, reps=200, seed=7)
    c = grouped_bootstrap(y, proba, ["mel", "nv"], groups, reps=200, seed=8)
    assert a == b and a != c


@pytest.mark.parametrize("k", [2, 3, 4])
def test_majority_baseline(k):
    classes = ["akiec", "bcc", "mel", "nv"][:k]
    counts = [3, 5, 7, 20][:k]
    y = np.concatenate([[c] * n for c, n in zip(classes, counts)]).astype(object)
    proba = confident(list(y), classes, top=0.7)
    r = evaluate(y, proba, classes, np.arange(len(y)), positive=None, majority=classes[-1])
    base = r["baseline"]
    assert base["class"] == classes[-1]
    assert base["balanced_accuracy"] == pytest.approx(1 / k)
    assert base["accuracy"] == pytest.approx(counts[-1] / sum(counts))
    assert base["auc"] == 0.5
    assert r["balanced_accuracy"] == pytest.approx(1.0) and r["auc"] == pytest.approx(1.0)


def test_default_positive():
    assert default_positive(["bcc", "mel", "nv"]) == "mel"
    assert default_positive(["MEL", "NV"]) == "MEL"
    assert default_positive(["Melanoma", "Nevus"]) == "Melanoma"
    assert default_positive(["nv", "bcc"]) is None
    assert default_positive(["melanocytic", "nv"]) is None
    assert default_positive([]) is None


def test_balanced_offsets_find_the_best_threshold_when_the_argmax_is_off():
    from classify.metrics import balanced_offsets, shift_proba, threshold_of

    rng = np.random.default_rng(0)
    codes = np.r_[np.zeros(300, int), np.ones(60, int)]
    score = np.r_[rng.normal(0, 1, 300), rng.normal(1.5, 1, 60)]
    p1 = 1 / (1 + np.exp(-(score - 3)))  # scores that rank well but whose argmax almost never says 1
    proba = np.c_[1 - p1, p1]

    def ba(decided: np.ndarray) -> float:
        return float(np.mean([np.mean(decided[codes == c] == c) for c in (0, 1)]))

    offsets = balanced_offsets(codes, proba)
    best = ba(shift_proba(proba, offsets).argmax(axis=1))
    assert ba(proba.argmax(axis=1)) < 0.55 and best > 0.8
    every = max(ba((p1 > t).astype(int)) for t in np.unique(p1))  # no threshold does better
    assert best == pytest.approx(every)
    assert ba((p1 > threshold_of(offsets)).astype(int)) == pytest.approx(best)
    # three classes, one favoured by a bias: the offsets take it away
    y = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), y] += 1.2
    logits[:, 0] += 1.5
    proba3 = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ba3 = lambda p: np.mean([np.mean(p.argmax(axis=1)[y == c] == c) for c in range(3)])  # noqa: E731
    assert ba3(shift_proba(proba3, balanced_offsets(y, proba3))) > ba3(proba3) + 0.05
