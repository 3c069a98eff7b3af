"""classify/runs.py: one run record and one writer for every kind of run, and run folders that keep
loading and scoring the same."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_store

from classify.heads import LinearHead
from classify.inputs import InputSpec
from classify.metrics import evaluate
from classify.predict import evaluate_run
from classify.report import study_parts, training_parts
from classify.runs import (
    CARD,
    EXTRACTION_KEYS,
    RunError,
    RunRecord,
    extraction_record,
    jsonable,
    load_run,
    read_card,
    read_run_split,
    write_run,
)
from features.splits import TEST, UNUSED
from features.store import FeatureStore

FIT_ENTRIES = {"study"}
FINETUNE_ENTRIES = {"kind", "init", "unfreeze", "best_epoch", "decision"}
"""The card entries of one kind of run only; every other entry is the same for both."""


@pytest.fixture
def refit(tmp_path) -> dict:
    """A head refitted on the study rows of a synthetic store, and its figures: what both `fit` and
    `finetune` hand to the run writer."""
    path = synthetic_store(tmp_path / "syn.h5", n=80)
    store = FeatureStore(path)
    ids = store.column("image_id")
    y = store.column("label").astype(object)
    groups = store.column("group")
    folds = np.where(np.arange(len(ids)) % 5 == 0, TEST, np.arange(len(ids)) % 3).astype(np.int8)
    folds[-2:] = UNUSED
    x = store.embeddings("fake")
    study, test = folds >= 0, folds == TEST
    head = LinearHead(C=1.0).fit(x[study], y[study])
    classes = [str(c) for c in head.classes_]
    proba = {"test": head.predict_proba(x[test]), "second": head.predict_proba(x[folds == 0])}
    metrics = {
        "test": evaluate(y[test], proba["test"], classes, groups[test], "mel", "nv"),
        "second": evaluate(y[folds == 0], proba["second"], classes, groups[folds == 0], "mel", "nv"),
    }
    return {
        "store": store,
        "head": head,
        "ids": ids,
        "y": y,
        "folds": folds,
        "classes": classes,
        "proba": proba,
        "metrics": metrics,
    }


def _record(refit: dict, kind: str) -> RunRecord:
    """The record `fit` (kind "fit") or `finetune` (kind "finetune") fills for the same refitted head."""
    ids, y, folds, proba, m = refit["ids"], refit["y"], refit["folds"], refit["proba"], refit["metrics"]
    test, second = folds == TEST, folds == 0
    common = {"features": str(refit["store"].path), "split": "t0.2-k3-s0", "views": "mean", "meta": ""}
    if kind == "fit":
        metrics = {
            "test": m["test"],
            "cv": {**m["second"], "study_best_value": 0.9, "folds": 3, "protocol": "cv"},
            "left_out": {},
        }
        config = {**common, "head": "linear", "backbone": "fake", "study": "linear.fake.1234", "params": {"C": 1.0}}
        trials = [{"number": 0, "state": "COMPLETE", "value": 0.9, "params": {"C": 1.0}}]
        parts = study_parts(metrics, config, trials)
        card_extra = {"study": config["study"]}
        extra_files = {"study.json": {"name": config["study"], "trials": trials}}
        second_part, failed = "cv", {}
    else:
        metrics = {"test": m["test"], "validation": m["second"], "left_out": {}}
        decision = {"offsets": [0.0, 0.1], "classes": refit["classes"], "threshold": {"nv": 0.47}}
        config = {
            **common,
            "kind": "finetune",
            "head": "linear",
            "backbone": "fake",
            "unfreeze": "all",
            "bn": "frozen",
            "init": None,
            "lr": 1e-3,
            "backbone_lr": 1e-4,
            "precision": "fp32",
            "best_epoch": 1,
            "decision": decision,
            "refit": {"epochs": 1},
        }
        epochs = [
            {"epoch": 0, "loss": None, "images_per_s": None, "val_balanced_accuracy": 0.5, "val_auc": 0.6},
            {"epoch": 1, "loss": 0.4, "images_per_s": 20.0, "val_balanced_accuracy": 0.8, "val_auc": 0.9},
        ]
        parts = training_parts(config, epochs)
        card_extra = {"kind": "finetune", "init": None, "unfreeze": "all", "best_epoch": 1, "decision": decision}
        extra_files = {"history.json": epochs}
        second_part, failed = "validation", {"img9999": "cannot be decoded: truncated, 0 bytes"}
    return RunRecord(
        head=refit["head"],
        store=refit["store"].path,
        split="t0.2-k3-s0",
        ids=ids,
        folds=folds,
        sha256=refit["store"].column("sha256"),
        inputs=InputSpec(("fake",)),
        meta_encoder={},
        extraction=extraction_record(refit["store"], ["fake"]),
        positive="mel",
        majority="nv",
        config=config,
        metrics=metrics,
        predictions={"test": (ids[test], proba["test"]), second_part: (ids[second], proba["second"])},
        test_labels=y[test],
        counts={"study": {"mel": 1}, "test": {"mel": 1}},
        report=parts,
        card_extra=card_extra,
        extra_files=extra_files,
        failed=failed,
    )


def test_the_refit_writes_the_same_card_from_fit_or_finetune(tmp_path, refit):
    write_run(tmp_path / "fit", _record(refit, "fit"))
    write_run(tmp_path / "finetune", _record(refit, "finetune"))
    fit_card, finetune_card = read_card(tmp_path / "fit"), read_card(tmp_path / "finetune")
    assert set(fit_card) - set(finetune_card) == FIT_ENTRIES
    assert set(finetune_card) - set(fit_card) == FINETUNE_ENTRIES
    # the same head and split: every entry they share is the same, extraction record included
    assert {k: v for k, v in fit_card.items() if k not in FIT_ENTRIES} == {
        k: v for k, v in finetune_card.items() if k not in FINETUNE_ENTRIES
    }
    for card in (fit_card, finetune_card):
        assert tuple(card["extraction"]["fake"]) == EXTRACTION_KEYS
        assert card["extraction"]["fake"]["fingerprint"] == "synthetic0"
    for kind in ("fit", "finetune"):
        run = load_run(tmp_path / kind)
        assert run.classes == refit["classes"] and run.inputs.backbones == ("fake",)
        x = refit["store"].embeddings("fake")[refit["folds"] == TEST]
        np.testing.assert_allclose(run.head.predict_proba(x), refit["proba"]["test"])
        split = read_run_split(tmp_path / kind)
        assert len(split.image_id) == len(refit["ids"]) - 2  # the UNUSED rows are not recorded
        assert json.loads((tmp_path / kind / "metrics.json").read_text())["test"]["n"] == refit["metrics"]["test"]["n"]


def test_each_kind_writes_its_own_files_and_report_sections(tmp_path, refit):
    fit, finetune = tmp_path / "fit", tmp_path / "finetune"
    write_run(fit, _record(refit, "fit"))
    write_run(finetune, _record(refit, "finetune"))
    shared = ["config.json", "metrics.json", "report.md", "test_predictions.csv", CARD, "split.npz"]
    shared += ["plots/confusion_matrix.png", "plots/roc_curves.png", "plots/reliability.png"]
    for name in [*shared, "study.json", "cv_predictions.csv", "plots/optimisation_history.png"]:
        assert (fit / name).is_file(), name
    for name in [*shared, "history.json", "validation_predictions.csv", "failed.csv", "plots/training_history.png"]:
        assert (finetune / name).is_file(), name
    assert not (fit / "failed.csv").exists() and not (fit / "history.json").exists()
    header = (fit / "test_predictions.csv").read_text().splitlines()[0]
    assert header == "image," + ",".join(refit["classes"]) + ",predicted,decision"
    # a reason with a comma stays one field
    with open(finetune / "failed.csv", newline="") as handle:
        assert list(csv.reader(handle)) == [["image", "reason"], ["img9999", "cannot be decoded: truncated, 0 bytes"]]
    fit_report, finetune_report = (fit / "report.md").read_text(), (finetune / "report.md").read_text()
    assert "# Run report: linear on fake" in fit_report and "## Study" in fit_report
    assert "| cross-validation (out of fold) |" in fit_report and "The study's best balanced accuracy" in fit_report
    assert "![history](plots/optimisation_history.png)" in fit_report and "`study.json`" in fit_report
    assert "# Run report: fine-tuned fake" in finetune_report and "## Training" in finetune_report
    assert "before the refit on all study rows" in finetune_report and "Decision: `nv`" in finetune_report
    assert "![history](plots/training_history.png)" in finetune_report and "`backbone.pt`" in finetune_report
    for report in (fit_report, finetune_report):
        for section in ("## Headline", "## Per class (test rows)", "Confusion matrix", "## Data", "## Plots"):
            assert report.count(section) == 1, section


def test_a_record_that_would_misread_is_refused_before_any_file(tmp_path, refit):
    record = _record(refit, "fit")
    record.card_extra = {"store": "elsewhere.h5"}
    with pytest.raises(ValueError, match="store"):
        write_run(tmp_path / "a", record)
    record = _record(refit, "finetune")
    record.extraction = {"fake": {k: None for k in EXTRACTION_KEYS if k != "calibration"}}
    with pytest.raises(ValueError, match="EXTRACTION_KEYS"):
        write_run(tmp_path / "b", record)
    record = _record(refit, "fit")
    record.predictions = {"cv": record.predictions["cv"]}
    with pytest.raises(ValueError, match="test predictions"):
        write_run(tmp_path / "c", record)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _same_figures(scored: dict, recorded: dict) -> None:
    """The figures `evaluate` recomputed equal the ones the run recorded (after the JSON round trip)."""
    again = json.loads(json.dumps(jsonable(scored)))
    for key in ("n", "lesions", "balanced_accuracy", "accuracy", "auc", "ece", "ci95", "per_class"):
        assert again[key] == recorded[key], key
    assert again["confusion_matrix"] == recorded["confusion_matrix"] and again["baseline"] == recorded["baseline"]
    assert again["sensitivity_at_specificity"] == recorded["sensitivity_at_specificity"]


def test_a_fit_run_loads_and_scores_what_it_recorded(tmp_path, cli):
    store = synthetic_store(tmp_path / "syn.h5", n=240)
    run = tmp_path / "run"
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", run, "--folds", "3", "--trials", "2")
    assert code == 0, err
    recorded = json.loads((run / "metrics.json").read_text())["test"]
    loaded = load_run(run)
    assert loaded.card["extraction"]["fake"]["fingerprint"] == "synthetic0"
    _same_figures(evaluate_run(run), recorded)
    written = (run / "test_predictions.csv").read_text().splitlines()
    again = (run / "evaluations" / "test" / "predictions.csv").read_text().splitlines()
    assert sorted(written) == sorted(again)  # the same probabilities, to the written digits


def test_a_card_written_before_the_shared_key_list_still_loads_and_scores(tmp_path, cli):
    """Fine-tuning runs recorded their extraction without `calibration`, and their card began with
    `kind`: such a card loads, and `evaluate` scores what the run recorded."""
    store = synthetic_store(tmp_path / "syn.h5", n=240)
    run = tmp_path / "run"
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", run, "--folds", "3", "--trials", "2")
    assert code == 0, err
    card = json.loads((run / CARD).read_text())
    for recorded in card["extraction"].values():
        del recorded["calibration"]
    (run / CARD).write_text(json.dumps({"kind": "finetune", **card}, indent=2))
    assert "calibration" not in load_run(run).card["extraction"]["fake"]
    _same_figures(evaluate_run(run), json.loads((run / "metrics.json").read_text())["test"])


def test_extraction_record_is_the_one_key_list(tmp_path):
    store = FeatureStore(synthetic_store(tmp_path / "syn.h5", n=40))
    record = extraction_record(store, ["fake"])
    assert list(record) == ["fake"] and tuple(record["fake"]) == EXTRACTION_KEYS
    assert record["fake"]["calibration"] is None and record["fake"]["weights"] == "none"  # older stores lack keys
    assert Path(store.path).is_file()


def test_the_report_names_the_weights_licence_and_warns_of_a_closed_one():
    from classify.report import license_section

    assert license_section({"resnet50": {"license": None}}) == []  # families that record none
    open_ = "\n".join(license_section({"timm:convnext_tiny": {"license": "apache-2.0"}}))
    assert "timm:convnext_tiny `apache-2.0`" in open_ and "Warning" not in open_
    closed = "\n".join(license_section({"a": {"license": "apache-2.0"}, "b": {"license": "cc-by-nc-4.0"}}))
    assert "Warning: the b weights" in closed and "commercial" in closed and "the a weights" not in closed


def test_compare_takes_fit_and_finetune_runs_of_the_same_rows_and_refuses_others(tmp_path, refit):
    from dataclasses import replace

    from classify.compare import compare_runs

    write_run(tmp_path / "fit", _record(refit, "fit"))
    write_run(tmp_path / "finetune", _record(refit, "finetune"))
    result = compare_runs([tmp_path / "fit", tmp_path / "finetune"])
    (d,) = result["against_first"]
    assert d["delta_auc"]["value"] == 0 and d["delta_auc"]["p_value"] == 1.0  # the same head twice
    assert result["runs"][0]["auc"]["value"] == pytest.approx(refit["metrics"]["test"]["auc"])
    assert result["runs"][0]["auc"]["ci"] == pytest.approx(refit["metrics"]["test"]["ci95"]["auc"])
    record = _record(refit, "fit")
    other_files = np.array(["0" * 64] * len(record.ids))
    write_run(tmp_path / "other-files", replace(record, sha256=other_files))
    with pytest.raises(RunError, match="other files"):
        compare_runs([tmp_path / "fit", tmp_path / "other-files"])
    folds = record.folds.copy()
    folds[np.flatnonzero(folds == TEST)[0]] = 0  # one test image moved into the study rows
    test = folds == TEST
    predictions = {"test": (record.ids[test], refit["proba"]["test"][1:])}
    moved = replace(record, folds=folds, predictions=predictions, test_labels=refit["y"][test])
    write_run(tmp_path / "other-rows", moved)
    with pytest.raises(RunError, match="other test rows"):
        compare_runs([tmp_path / "fit", tmp_path / "other-rows"])
