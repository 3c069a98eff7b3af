"""The clinical figures (issue 16): the operating point chosen on the out-of-fold predictions and applied
unchanged to test rows, `predict` and `evaluate`; specificity at 95 % sensitivity and partial AUC as
ISIC 2024 scores it; calibration fitted out of fold; the malignant-vs-benign roll-up."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_store
from sklearn.metrics import auc, roc_curve

from classify.calibration import Calibration, brier_score, fit_calibration
from classify.metrics import WeightedRoc, evaluate, expected_calibration_error, pauc_above_tpr, spec_at_sens
from classify.operating import choose_threshold, decide, parse_rule
from classify.runs import load_run
from features.store import FeatureStore

FAST = ("--folds", "3", "--trials", "2")


def _fit(cli, store: Path, run: Path, *extra: str) -> None:
    """A linear fit of `store` into `run` (a quick study) that must succeed."""
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST, *extra)
    assert code == 0, err


def _rows(path: Path) -> dict[str, dict[str, str]]:
    return {row["image"]: row for row in csv.DictReader(open(path))}


def isic_2024_pauc(solution: np.ndarray, submission: np.ndarray, min_tpr: float = 0.80) -> float:
    """The ISIC 2024 challenge's scorer (its published metric, as written there): the oracle."""
    v_gt = abs(np.asarray(solution) - 1)
    v_pred = np.array([1.0 - x for x in submission])
    max_fpr = abs(1 - min_tpr)
    fpr, tpr, _ = roc_curve(v_gt, v_pred, sample_weight=None)
    stop = np.searchsorted(fpr, max_fpr, "right")
    x_interp = [fpr[stop - 1], fpr[stop]]
    y_interp = [tpr[stop - 1], tpr[stop]]
    tpr = np.append(tpr[:stop], np.interp(max_fpr, x_interp, y_interp))
    fpr = np.append(fpr[:stop], max_fpr)
    return auc(fpr, tpr)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_free_figures_match_the_challenge_scorer_and_roc_curve(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random(300) < 0.3
    score = np.round(np.clip(rng.normal(0.4 + 0.25 * truth, 0.2), 0, 1), 2)  # rounded: ties too
    fpr, tpr = WeightedRoc(truth, score).curve()
    assert pauc_above_tpr(fpr, tpr) == pytest.approx(isic_2024_pauc(truth.astype(int), score), abs=1e-12)
    ref_fpr, ref_tpr, _ = roc_curve(truth, score, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert spec_at_sens(fpr, tpr) == pytest.approx(1 - ref_fpr[ref_tpr >= 0.95].min())
    # a perfect ranking: the whole area (0.2) and full specificity; a weighting is a resample
    fpr, tpr = WeightedRoc(truth, truth.astype(float)).curve()
    assert pauc_above_tpr(fpr, tpr) == pytest.approx(0.2) and spec_at_sens(fpr, tpr) == 1.0
    weight = rng.integers(0, 3, len(truth)).astype(float)
    fpr, tpr = WeightedRoc(truth, score).curve(weight)
    ref_fpr, ref_tpr, _ = roc_curve(truth, score, sample_weight=weight)  # (which drops rows of weight 0)
    assert auc(fpr, tpr) == pytest.approx(auc(ref_fpr, ref_tpr), abs=1e-12)
    assert spec_at_sens(fpr, tpr) == pytest.approx(1 - ref_fpr[ref_tpr >= 0.95].min(), abs=1e-12)


def test_thresholds_meet_their_rule_on_the_rows_they_are_chosen_on():
    rng = np.random.default_rng(1)
    truth = rng.random(500) < 0.25
    score = np.clip(rng.normal(0.35 + 0.3 * truth, 0.18), 0, 1)
    t = choose_threshold("sens=0.95", truth, score)
    assert np.mean(score[truth] >= t) >= 0.95
    assert np.mean(score[truth] >= np.nextafter(t, 2)) < 0.95  # the highest such threshold
    t = choose_threshold("spec=0.9", truth, score)
    assert np.mean(score[~truth] < t) >= 0.9
    assert np.mean(score[~truth] < np.sort(score[~truth])[np.sum(score[~truth] < t) - 1]) < 0.9  # the lowest
    t = choose_threshold("youden", truth, score)
    youden = np.mean(score[truth] >= t) + np.mean(score[~truth] < t)
    assert all(np.mean(score[truth] >= u) + np.mean(score[~truth] < u) <= youden + 1e-12 for u in score)
    assert parse_rule("SENS=0.95") == "sens=0.95" and parse_rule("youden") == "youden"
    for bad in ("sens", "sens=1.5", "ppv=0.9", "spec=abc"):
        with pytest.raises(ValueError, match="sens=S or spec=S"):
            parse_rule(bad)
    proba = np.array([[0.3, 0.5, 0.2], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    assert list(decide(proba, ["bcc", "mel", "nv"], "mel", 0.25)) == ["mel", "nv", "bcc"]


def test_temperature_and_isotonic_calibration_fit_out_of_fold_and_round_trip_as_data():
    rng = np.random.default_rng(0)
    true = rng.dirichlet([1, 1, 1], 2000)
    codes = np.array([rng.choice(3, p=p) for p in true])
    sharp = true**3 / (true**3).sum(axis=1, keepdims=True)  # overconfident: temperature 3 undoes it

    def ece(p):
        return expected_calibration_error(p.argmax(axis=1) == codes, p.max(axis=1))

    temperature = fit_calibration("temperature", codes, sharp)
    assert temperature.temperature == pytest.approx(3.0, rel=0.15)
    after = temperature.apply(sharp)
    assert (after.argmax(axis=1) == sharp.argmax(axis=1)).all()  # the decisions stay
    assert ece(after) < ece(sharp) / 2 and brier_score(codes, after) < brier_score(codes, sharp)
    isotonic = fit_calibration("isotonic", codes, sharp)
    assert ece(isotonic.apply(sharp)) < ece(sharp) / 2
    np.testing.assert_allclose(isotonic.apply(sharp).sum(axis=1), 1)
    for fitted in (temperature, isotonic, Calibration()):
        again = Calibration.from_dict(json.loads(json.dumps(fitted.as_dict())))
        np.testing.assert_array_equal(again.apply(sharp), fitted.apply(sharp))
    binary = np.column_stack([1 - sharp[:, 0], sharp[:, 0]])
    iso2 = fit_calibration("isotonic", (codes == 0).astype(int), binary).apply(binary)
    np.testing.assert_allclose(iso2.sum(axis=1), 1)


def test_fit_sets_the_operating_point_out_of_fold_and_predict_and_evaluate_keep_it(tmp_path, cli):
    store = synthetic_store(tmp_path / "s.h5", n=240, separation=1.2)  # overlapping classes: a real choice
    run = tmp_path / "run"
    _fit(cli, store, run)
    card = load_run(run).card
    point, metrics = card["operating_point"], json.loads((run / "metrics.json").read_text())
    assert (point["rule"], point["positive"], card["calibration"]["method"]) == ("sens=0.95", "mel", "temperature")
    # the threshold is the rule's on the out-of-fold predictions, as written (calibrated) in the run
    samples = FeatureStore(store).samples()
    label_of = dict(zip(samples.image_id, samples.label))
    group_of = dict(zip(samples.image_id, samples.group))
    cv = _rows(run / "cv_predictions.csv")
    truth = np.array([label_of[i] == "mel" for i in cv])
    score = np.array([float(r["mel"]) for r in cv.values()])
    assert point["threshold"] == pytest.approx(choose_threshold("sens=0.95", truth, score), abs=1e-6)
    assert metrics["cv"]["operating_point"]["sensitivity"]["value"] >= 0.95
    # the test rows are scored at that fixed threshold: sensitivity and specificity from the CSV
    test = _rows(run / "test_predictions.csv")
    truth = np.array([label_of[i] == "mel" for i in test])
    score = np.array([float(r["mel"]) for r in test.values()])
    decided = np.array([r["decision"] == "mel" for r in test.values()])
    np.testing.assert_array_equal(decided, score >= point["threshold"])
    op = metrics["test"]["operating_point"]
    assert op["threshold"] == point["threshold"] and op["rule"] == "sens=0.95"
    assert op["sensitivity"]["value"] == pytest.approx(np.mean(decided[truth]), abs=1e-6)
    assert op["specificity"]["value"] == pytest.approx(np.mean(~decided[~truth]), abs=1e-6)
    lo, hi = op["sensitivity"]["ci"]
    assert lo <= op["sensitivity"]["value"] <= hi
    assert metrics["test"]["pauc_80"]["value"] == pytest.approx(isic_2024_pauc(truth.astype(int), score), abs=2e-6)
    assert 0 <= metrics["test"]["spec_at_95_sens"]["value"] <= 1
    calibration = metrics["cv"]["calibration"]
    assert calibration["method"] == "temperature" and calibration["ece_after"] <= calibration["ece_before"] + 1e-9
    assert {"ece_before", "ece_after", "brier_before", "brier_after"} <= set(metrics["test"]["calibration"])
    # evaluate on the run's own test rows: the same calibrated probabilities and the same figures
    code, _, err = cli("evaluate", "--run", run)
    assert code == 0, err
    again = json.loads((run / "evaluations" / "test" / "metrics.json").read_text())
    assert again["operating_point"] == op and again["pauc_80"] == metrics["test"]["pauc_80"]
    evaluated = _rows(run / "evaluations" / "test" / "predictions.csv")
    assert {i: r["decision"] for i, r in evaluated.items()} == {i: r["decision"] for i, r in test.items()}
    assert all(abs(float(evaluated[i]["mel"]) - float(test[i]["mel"])) < 1e-6 for i in test)
    assert len({group_of[i] for i in test}) == metrics["test"]["lesions"]


def test_options_of_the_operating_point_and_calibration(tmp_path, cli):
    store = synthetic_store(tmp_path / "s.h5", n=240)
    run = tmp_path / "youden"
    _fit(cli, store, run, "--operating-point", "youden", "--calibrate", "isotonic")
    card = load_run(run).card
    assert card["operating_point"]["rule"] == "youden" and card["calibration"]["method"] == "isotonic"
    run = tmp_path / "argmax"
    _fit(cli, store, run, "--operating-point", "none", "--calibrate", "none")
    metrics = json.loads((run / "metrics.json").read_text())
    assert load_run(run).card["operating_point"] is None and "operating_point" not in metrics["test"]
    assert "pauc_80" in metrics["test"]  # threshold-free: always, with a positive class
    rows = _rows(run / "test_predictions.csv")
    assert all(r["decision"] == r["predicted"] for r in rows.values())
    bad = ("--operating-point", "x")
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", tmp_path / "x", *bad)
    assert code == 2 and "sens=S or spec=S" in err and "Traceback" not in err
    no_mel = synthetic_store(tmp_path / "n.h5", n=240, classes=("bkl", "nv"))
    code, _, err = cli(
        "fit", "--features", no_mel, "--head", "linear", "--out", tmp_path / "y", "--operating-point", "spec=0.9"
    )
    assert code == 2 and "--positive" in err


def test_a_multi_class_run_rolls_up_malignant_against_benign():
    rng = np.random.default_rng(0)
    classes = ["bcc", "bkl", "mel", "nv"]
    y = np.array(classes, dtype=object)[rng.integers(0, 4, 400)]
    proba = rng.dirichlet([1, 1, 1, 1], 400)
    proba[np.arange(400), [classes.index(c) for c in y]] += 1
    proba /= proba.sum(axis=1, keepdims=True)
    m = evaluate(y, proba, classes, np.arange(400) // 2, "mel", "nv")
    rollup = m["malignant_vs_benign"]
    assert rollup["malignant"] == ["bcc", "mel"]
    malignant = np.isin(y, ["bcc", "mel"])
    score = proba[:, 0] + proba[:, 2]
    assert rollup["pauc_80"]["value"] == pytest.approx(isic_2024_pauc(malignant.astype(int), score), abs=1e-12)
    two = np.where(malignant, "mel", "nv")
    binary = np.column_stack([score, 1 - score])
    assert "malignant_vs_benign" not in evaluate(two, binary, ["mel", "nv"], np.arange(400) // 2, "mel", "nv")


def test_ages_are_banded_numbers_quartered_and_blanks_a_group_of_their_own():
    from classify.subgroups import bin_values

    ages = np.array(["12", "30", "49.5", "50", "69", "70", "", "85"], dtype=object)
    assert list(bin_values("age", ages)) == ["<30", "30-49", "30-49", "50-69", "50-69", ">=70", "missing", ">=70"]
    sizes = np.array([str(v) for v in range(1, 41)] + ["unknown"], dtype=object)
    binned = bin_values("diameter", sizes)
    assert len(set(binned)) == 5 and binned[-1] == "missing"  # four quartiles and the blank
    assert list(bin_values("fitzpatrick", np.array(["1", "2", "6", ""]))) == ["1", "2", "6", "missing"]


def test_subgroups_of_a_fit_add_up_to_its_test_rows_and_evaluate_scores_them_elsewhere(tmp_path, cli):
    store = synthetic_store(tmp_path / "s.h5", n=400)
    run = tmp_path / "run"
    _fit(cli, store, run, "--subgroups", "site,age")
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    for column in ("site", "age"):
        rows = test["subgroups"][column]
        assert sum(r["images"] for r in rows) == test["n"]
        for r in rows:
            assert (r["auc"] is None) == (not r["judged"])
    site = {r["group"]: r for r in test["subgroups"]["site"]}
    assert set(site) == {"back", "face"} and all(r["judged"] for r in site.values())
    assert site["back"]["sensitivity"]["value"] >= 0 and len(site["back"]["auc"]["ci"]) == 2
    assert {r["group"] for r in test["subgroups"]["age"]} <= {"<30", "30-49", "50-69", ">=70", "missing"}
    report = (run / "report.md").read_text()
    assert "## Subgroups (test rows)" in report and "worst-group gap in sensitivity" in report
    other = synthetic_store(tmp_path / "o.h5", n=200, prefix="ext", draw=1)
    code, _, err = cli("evaluate", "--run", run, "--features", other, "--subgroups", "site")
    assert code == 0, err
    external = json.loads((run / "evaluations" / "o" / "metrics.json").read_text())
    assert sum(r["images"] for r in external["subgroups"]["site"]) == external["n"] == 200
    report = (run / "evaluations" / "o" / "report.md").read_text()
    assert "| | this evaluation | the run's test rows |" in report and "## Subgroups (scored rows)" in report
    assert f"| images (lesions) | 200 ({external['lesions']}) | {test['n']} ({test['lesions']}) |" in report
    for plot in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert (run / "evaluations" / "o" / "plots" / plot).stat().st_size > 1000
    page = (run / "evaluations" / "o" / "report.html").read_text()  # the same sections, plots inlined
    assert "<h2>Subgroups (scored rows)</h2>" in page and "<h2>Error gallery</h2>" in page
    assert page.count('src="data:image/png;base64,') == 3 and 'src="plots/' not in page
    code, out, err = cli("evaluate", "--run", run, "--features", other)  # again: a new folder, the first kept
    assert code == 0 and str(run / "evaluations" / "o-2" / "report.md") in out
    assert json.loads((run / "evaluations" / "o" / "metrics.json").read_text())["subgroups"]
    code, _, err = cli("evaluate", "--run", run, "--subgroups", "skin_type")
    assert code == 2 and "skin_type" in err and "site" in err
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", tmp_path / "x", "--subgroups", "tone")
    assert code == 2 and "tone" in err and not (tmp_path / "x" / "metrics.json").exists()


def test_compare_two_runs_paired_and_runs_on_other_rows_refused(tmp_path, cli):
    store = synthetic_store(tmp_path / "s.h5", n=240, separation=1.5)
    runs = {}
    for name, extra in (("plain", ()), ("with-meta", ("--meta", "age,site"))):  # two models, one split
        runs[name] = tmp_path / name
        _fit(cli, store, runs[name], *extra)
    out, as_json = tmp_path / "c.md", tmp_path / "c.json"
    code, stdout, err = cli("compare", runs["plain"], runs["with-meta"], "--out", out, "--json", as_json)
    assert code == 0, err
    result = json.loads(as_json.read_text())
    (d,) = result["against_first"]
    test = {h: json.loads((r / "metrics.json").read_text())["test"] for h, r in runs.items()}
    assert d["delta_auc"]["value"] == pytest.approx(test["with-meta"]["auc"] - test["plain"]["auc"])
    assert d["delta_balanced_accuracy"]["value"] == pytest.approx(
        test["with-meta"]["balanced_accuracy"] - test["plain"]["balanced_accuracy"]
    )
    for key in ("delta_auc", "delta_balanced_accuracy"):
        lo, hi = d[key]["ci"]
        assert lo <= d[key]["value"] <= hi and 0 < d[key]["p_value"] <= 1
    # paired: the difference varies less than the two runs' own figures would if drawn apart
    spread = [r["auc"]["ci"][1] - r["auc"]["ci"][0] for r in result["runs"]]
    assert d["delta_auc"]["ci"][1] - d["delta_auc"]["ci"][0] < np.hypot(*spread)
    assert "paired" in out.read_text() and "AUC difference" in stdout
    other = tmp_path / "other-seed"
    _fit(cli, store, other, "--seed", "1")
    code, _, err = cli("compare", runs["plain"], other)
    assert code == 2 and "other test rows" in err and "Traceback" not in err


def test_isic_format_is_what_the_challenge_scorer_reads(tmp_path, cli):
    """`--format isic`: every category of ISIC 2018 task 3 present, as the challenge's own scorer
    (isic-challenge-scoring) reads it and scores it like this toolkit does; the toolkit's own CSV is
    refused by that scorer, which is why the format exists."""
    import io

    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
    from isic_challenge_scoring.types import ScoreError

    ham = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # the scorer needs every category in the truth
    store = synthetic_store(tmp_path / "s.h5", n=700, classes=ham)
    run = tmp_path / "run"
    _fit(cli, store, run, "--allow-small-test")
    code, out, err = cli("evaluate", "--run", run, "--format", "isic")
    assert code == 0, err
    folder = run / "evaluations" / "test"
    submission = (folder / "predictions.isic.csv").read_text()
    assert submission.splitlines()[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC"
    samples = FeatureStore(store).samples()
    label_of = dict(zip(samples.image_id, samples.label))
    ids = [line.split(",")[0] for line in submission.splitlines()[1:]]
    categories = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    truth = "image," + ",".join(categories) + "\n"
    truth += "".join(
        i + "," + ",".join("1.0" if label_of[i].upper() == c else "0.0" for c in categories) + "\n" for i in ids
    )
    score = ClassificationScore.from_stream(io.StringIO(truth), io.StringIO(submission), ClassificationMetric.AUC)
    ours = json.loads((folder / "metrics.json").read_text())["per_class"]
    for c in ham:
        assert score.per_category.loc[c.upper(), "auc"] == pytest.approx(ours[c]["auc"], abs=1e-4)
    with pytest.raises(ScoreError, match="column"):
        own = (folder / "predictions.csv").read_text()
        ClassificationScore.from_stream(io.StringIO(truth), io.StringIO(own), ClassificationMetric.AUC)
    code, _, err = cli("evaluate", "--run", run, "--format", "isic2020")
    assert code == 2 and "not a category of ISIC 2020" in err and "Traceback" not in err


def test_external_images_that_copy_training_images_are_scored_apart(tmp_path, cli):
    """An external store in which some images are near-copies of images the run trained on (another id,
    another file, nearly the same embedding): they are counted, scored apart, and kept out of the
    external figures; an external store of nothing else has nothing external to score."""
    import h5py

    from classify.runs import read_run_split

    store = synthetic_store(tmp_path / "s.h5", n=240)
    run = tmp_path / "run"
    _fit(cli, store, run)
    other = synthetic_store(tmp_path / "o.h5", n=100, prefix="ext", draw=1)
    split = read_run_split(run)
    trained = np.flatnonzero(np.isin(FeatureStore(store).column("image_id"), split.image_id[split.seen]))[:30]
    with h5py.File(other, "r+") as f, h5py.File(store, "r") as g:
        data = f["embeddings/fake/data"]
        data[:30] = g["embeddings/fake/data"][trained] + 0.01  # 30 re-filed near-copies
    code, out, err = cli("evaluate", "--run", run, "--features", other)
    assert code == 0, err
    metrics = json.loads((run / "evaluations" / "o" / "metrics.json").read_text())
    near = metrics["near_duplicates"]
    assert near["images"] == 30 and metrics["n"] == 70 and near["ids"] == [f"ext{i:04d}" for i in range(30)]
    assert 0 <= near["auc"] <= 1 and "30 near-duplicates of training images" in out  # scored: both classes
    assert "Near-duplicates of images the run trained on" in (run / "evaluations" / "o" / "report.md").read_text()
    code, _, err = cli("evaluate", "--run", run, "--features", other, "--near-duplicates", "0")
    assert code == 0 and json.loads((run / "evaluations" / "o-2" / "metrics.json").read_text())["n"] == 100
