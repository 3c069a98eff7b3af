"""Label efficiency (`fit --fractions`): nested lesion-grouped subsets, each fitted by the same recipe and
scored on the same test rows."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import synthetic_store

from classify.runs import load_run, read_run_split
from features.splits import TEST, SplitSpec, make_split, study_subset
from features.store import FeatureStore

FAST = ("--folds", "3", "--trials", "3")


def test_subsets_are_nested_whole_lesions_with_every_class_in_every_fold():
    rng = np.random.default_rng(1)
    groups = np.array([f"L{i // 3}" for i in range(900)], dtype=object)  # 300 lesions of 3 images
    labels = np.where(rng.random(300) < 0.2, "mel", "nv")[np.arange(900) // 3]
    folds = make_split(labels, groups, SplitSpec(folds=5))
    study_lesions = len(set(groups[folds >= 0]))
    previous = np.zeros(len(folds), dtype=bool)
    for share in (0.1, 0.25, 0.5, 1.0):
        kept = study_subset(folds, labels, groups, share, seed=0)
        assert not (kept & (folds < 0)).any()  # never a test row
        assert (kept & previous).sum() == previous.sum()  # nested: the smaller share is inside
        previous = kept
        for g in set(groups[folds >= 0]):  # whole lesions only
            assert len(set(kept[groups == g])) == 1
        for k in range(5):
            assert set(labels[kept & (folds == k)]) == {"mel", "nv"}
        assert len(set(groups[kept])) == pytest.approx(share * study_lesions, rel=0.1, abs=10)
        # the class mix of the study rows is kept
        mix = Counter(labels[kept])
        assert mix["mel"] / kept.sum() == pytest.approx(np.mean(labels[folds >= 0] == "mel"), abs=0.05)
    assert (study_subset(folds, labels, groups, 0.25, seed=0) == study_subset(folds, labels, groups, 0.25, 0)).all()
    assert not (study_subset(folds, labels, groups, 0.25, seed=1) == study_subset(folds, labels, groups, 0.25, 0)).all()


def test_fractions_fit_each_share_on_the_same_test_rows(tmp_path, cli):
    store = synthetic_store(tmp_path / "syn.h5", n=240, separation=1.5)
    plain, run = tmp_path / "plain", tmp_path / "run"
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", plain, *FAST)
    assert code == 0, err
    code, out, err = cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST, "--fractions", "0.25")
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["label_efficiency"]
    assert [r["share"] for r in rows] == [0.25, 1.0]  # 1 (the run itself) is always a row
    # the share-1 row is the run itself, which is a plain fit: the same figures
    plain_test = json.loads((plain / "metrics.json").read_text())["test"]
    assert rows[1]["auc"] == plain_test["auc"] and rows[1]["balanced_accuracy"] == plain_test["balanced_accuracy"]
    assert rows[1]["ci95"]["auc"] == plain_test["ci95"]["auc"]
    # the share's own run: a complete run of its own, on the same test rows, learning from a quarter of
    # the study lesions (and only from the plain run's study rows)
    small = run / "fractions" / "0.25"
    assert load_run(small).card["head"] == "linear"
    full_split, small_split = read_run_split(run), read_run_split(small)
    test_ids = sorted(full_split.image_id[full_split.fold == TEST])
    assert test_ids == sorted(small_split.image_id[small_split.fold == TEST])
    assert set(small_split.image_id[small_split.fold >= 0]) < set(full_split.image_id[full_split.fold >= 0])
    groups = dict(zip(FeatureStore(store).column("image_id"), FeatureStore(store).column("group")))
    lesions = {groups[i] for i in small_split.image_id[small_split.fold >= 0]}
    assert rows[0]["study_lesions"] == len(lesions) == pytest.approx(0.25 * rows[1]["study_lesions"], abs=3)
    assert rows[0]["auc"] == json.loads((small / "metrics.json").read_text())["test"]["auc"]
    config = json.loads((small / "config.json").read_text())
    assert config["fraction"] == 0.25 and config["study"].endswith("-frac0.25")
    report = (run / "report.md").read_text()
    assert "## Label efficiency (test rows)" in report and "| 0.25 |" in report and "`fractions/0.25`" in report
    assert (run / "plots" / "label_efficiency.png").stat().st_size > 5000
    # scored on the same rows, the two runs can be compared pair for pair
    code, out, err = cli("compare", run, small)
    assert code == 0, err
    assert "the same in every run" in out


def test_bad_fractions_are_refused_before_training(tmp_path, cli):
    store = synthetic_store(tmp_path / "syn.h5", n=120)
    for bad in ("0", "1.5", "half"):
        code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", tmp_path / "r", "--fractions", bad)
        assert code == 2 and "--fractions" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "r").exists()
