"""End to end: fit (study, refit, test, report), evaluate, predict, run safety, concurrent workers."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import optuna
import pytest
from sklearn.metrics import balanced_accuracy_score
from conftest import ROOT, TINY, synthetic_store
from imagefiles import lesion_set

from classify.runs import RunError, load_run, read_run_split
from features.splits import TEST, split_digest
from features.store import FeatureStore

FAST = ("--folds", "3", "--trials", "3")


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    return {row["image"]: row for row in csv.DictReader(open(path))}


@pytest.fixture
def store(tmp_path) -> Path:
    return synthetic_store(tmp_path / "syn.h5", n=240)  # 12 lesions of each class in the test part


def test_fit_writes_a_complete_honest_run(tmp_path, store, cli):
    run = tmp_path / "run"
    code, out, err = cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)
    assert code == 0, err
    assert "test: balanced accuracy" in out and str(run / "report.md") in out
    assert out.strip().splitlines()[-1] == f"report.html: {run / 'report.html'}"
    for name in (
        "config.json",
        "run.json",
        "study.json",
        "metrics.json",
        "report.md",
        "report.html",
        "test_predictions.csv",
        "cv_predictions.csv",
        "plots/confusion_matrix.png",
        "plots/roc_curves.png",
        "plots/reliability.png",
        "plots/optimisation_history.png",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for part in ("test", "cv"):
        assert {"balanced_accuracy", "auc", "accuracy", "per_class", "ece", "ci95", "baseline"} <= set(metrics[part])
    assert metrics["test"]["balanced_accuracy"] > 0.9 and metrics["test"]["auc"] > 0.95  # separable data
    assert metrics["test"]["positive"] == "mel" and set(metrics["test"]["sensitivity_at_specificity"]) == {
        "0.80",
        "0.90",
    }
    config = json.loads((run / "config.json").read_text())
    assert config["head"] == "linear" and config["backbone"] == "fake" and "C" in config["params"]
    # the test rows: exactly the split's (kept in the run, not written into the store), no lesion of
    # theirs in the study rows
    recorded = read_run_split(run)
    with h5py.File(store) as f:
        assert "splits" not in f
        group_of = dict(zip(f["samples/image_id"].asstr()[()], f["samples/group"].asstr()[()]))
    ids, split = recorded.image_id, recorded.fold
    assert sorted(_read_csv(run / "test_predictions.csv")) == sorted(ids[split == TEST])
    assert sorted(_read_csv(run / "cv_predictions.csv")) == sorted(ids[split >= 0])
    assert not {group_of[i] for i in ids[split == TEST]} & {group_of[i] for i in ids[split >= 0]}
    assert load_run(run).card["split_digest"] == split_digest(ids, split)
    header = (run / "test_predictions.csv").read_text().splitlines()[0]
    assert header == "image,mel,nv,predicted,decision"
    study = json.loads((run / "study.json").read_text())
    assert len(study["trials"]) == 3
    # the reported out-of-fold predictions are the best trial's own: refitting its parameters fold by
    # fold reproduces the balanced accuracy the study scored it by, fold for fold
    rows = _read_csv(run / "cv_predictions.csv")
    fold_of, truth = dict(zip(ids, split)), dict(zip(recorded.image_id, recorded.fold))
    with h5py.File(store) as f:
        label_of = dict(zip(f["samples/image_id"].asstr()[()], f["samples/label"].asstr()[()]))
    refitted = []
    for k in range(max(truth.values()) + 1):
        fold = [i for i in rows if fold_of[i] == k]
        predicted = ["mel" if float(rows[i]["mel"]) > float(rows[i]["nv"]) else "nv" for i in fold]
        refitted.append(balanced_accuracy_score([label_of[i] for i in fold], predicted))
    assert refitted == pytest.approx(study["best"]["fold_balanced_accuracy"], abs=1e-9)
    assert study["best"]["value"] == pytest.approx(np.mean(refitted), abs=1e-9)


@pytest.mark.parametrize("head", ["mlp", "xgboost"])
def test_other_heads_run_a_study(tmp_path, store, cli, head):
    code, _, err = cli(
        "fit", "--features", store, "--head", head, "--out", tmp_path / head, "--folds", "2", "--trials", "2"
    )
    assert code == 0, err
    run = load_run(tmp_path / head)
    assert run.card["head"] == head
    assert json.loads((tmp_path / head / "metrics.json").read_text())["test"]["auc"] > 0.9


def test_bad_requests_fail_before_training_with_what_exists(tmp_path, store, cli):
    code, _, err = cli("fit", "--features", store, "--head", "svm", "--out", tmp_path / "r")
    assert code == 2 and "linear" in err and "xgboost" in err
    code, _, err = cli(
        "fit", "--features", store, "--head", "linear", "--backbone", "resnet50", "--out", tmp_path / "r"
    )
    assert code == 2 and "resnet50" in err and "fake" in err
    unlabelled = synthetic_store(tmp_path / "unlabelled.h5", n=40, classes=("",))
    code, _, err = cli("fit", "--features", unlabelled, "--head", "linear", "--out", tmp_path / "r")
    assert code == 2 and "no labels" in err
    rare = synthetic_store(tmp_path / "rare.h5", n=30, classes=("mel", "nv", "nv", "nv", "nv", "nv", "df"), per_group=1)
    code, _, err = cli("fit", "--features", rare, "--head", "linear", "--out", tmp_path / "r", "--folds", "5")
    assert code == 2 and "'df' has" in err and "groups" in err
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--meta", "weight", "--out", tmp_path / "r")
    assert code == 2 and "weight" in err and "age" in err
    assert not (tmp_path / "r" / "run.json").exists()


def test_views_and_metadata_inputs(tmp_path, cli):
    store = synthetic_store(tmp_path / "views.h5", n=240, views=4)
    run = tmp_path / "run"
    code, _, err = cli(
        "fit", "--features", store, "--head", "linear", "--out", run, "--views", "all", "--meta", "age,site", *FAST
    )
    assert code == 0, err
    loaded = load_run(run)
    assert loaded.inputs.views == "all" and loaded.inputs.meta == ("age", "site")
    assert loaded.card["meta_encoder"]["age"]["kind"] == "number"
    assert loaded.card["meta_encoder"]["site"] == {"kind": "category", "categories": ["back", "face"]}
    assert loaded.head.coef_.shape[1] == 16 + 2 + 2  # embedding + (age, age_missing) + one-hot site
    code, out, err = cli("evaluate", "--run", run)
    assert code == 0, err
    own = _read_csv(run / "test_predictions.csv")
    again = _read_csv(run / "evaluations" / "test" / "predictions.csv")
    assert own.keys() == again.keys()
    assert all(abs(float(own[i]["mel"]) - float(again[i]["mel"])) < 1e-6 for i in own)


def test_a_second_fit_resumes_the_study(tmp_path, store, cli):
    run = tmp_path / "run"
    assert cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)[0] == 0
    assert cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)[0] == 0
    assert len(json.loads((run / "study.json").read_text())["trials"]) == 6


def test_two_processes_on_one_study_keep_every_trial(tmp_path, store):
    run = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--features",
        str(store),
        "--head",
        "linear",
        "--out",
        str(run),
        "--folds",
        "3",
        "--trials",
        "4",
    ]
    procs = [
        subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    name = json.loads((run / "config.json").read_text())["study"]
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "study.journal")))
    study = optuna.load_study(study_name=name, storage=storage)
    assert len(study.trials) == 8 and all(t.state.is_finished() for t in study.trials)
    assert load_run(run).card["head"] == "linear"


def test_a_tampered_head_file_is_refused(tmp_path, store, cli):
    run = tmp_path / "run"
    assert cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)[0] == 0
    head = run / "head" / "head.npz"
    with np.load(head) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["coef"] = -arrays["coef"]  # a valid file with other numbers: only the hash can tell
    np.savez(head, **arrays)
    with pytest.raises(RunError, match="modified"):
        load_run(run)
    code, _, err = cli("evaluate", "--run", run)
    assert code == 2 and "head.npz" in err


def test_external_validation_checks_fingerprints_and_labels(tmp_path, store, cli):
    run = tmp_path / "run"
    assert cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)[0] == 0
    other = synthetic_store(tmp_path / "other.h5", n=60, classes=("melanoma", "nevus"), prefix="ext", draw=1)
    code, _, err = cli("evaluate", "--run", run, "--features", other)
    assert code == 2 and "melanoma" in err and "--label-map" in err
    code, out, err = cli("evaluate", "--run", run, "--features", other, "--label-map", "melanoma=mel,nevus=nv")
    assert code == 0, err
    metrics = json.loads((run / "evaluations" / "other" / "metrics.json").read_text())
    assert metrics["n"] == 60 and metrics["auc"] > 0.9  # same generator: the same classes
    alien = synthetic_store(tmp_path / "alien.h5", n=60, seed=5, prefix="ext")  # another fingerprint
    code, _, err = cli("evaluate", "--run", run, "--features", alien)
    assert code == 2 and "other settings" in err


def test_predict_reproduces_the_run_and_lists_bad_images(tmp_path, cli):
    manifest = lesion_set(tmp_path / "data", 12)
    store = tmp_path / "real.h5"
    code, _, err = cli(
        "extract",
        "--data",
        manifest,
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--out",
        store,
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--runtime",  # predict must follow the store's runtime, not resolve `auto` to OpenVINO
        "torch",
    )
    assert code == 0, err
    run = tmp_path / "run"
    code, _, err = cli(
        "fit",
        "--features",
        store,
        "--head",
        "linear",
        "--out",
        run,
        "--folds",
        "2",
        "--trials",
        "2",
        "--test-fraction",
        "0.34",
        "--allow-small-test",
    )
    assert code == 0, err
    expected = _read_csv(run / "test_predictions.csv")
    folder = tmp_path / "new"
    folder.mkdir()
    for image_id in expected:
        shutil.copy(tmp_path / "data" / "img" / f"{image_id}.png", folder / f"{image_id}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "preds.csv"
    code, stdout, err = cli("predict", "--run", run, "--images", folder, "--out", out, "--workers", "0")
    assert code == 0, err
    assert "failed: broken: " in err and "1 could not be" in stdout
    got = _read_csv(out)
    assert got["broken"]["error"] and got["broken"]["mel"] == "" and got["broken"]["predicted"] == ""
    del got["broken"]
    assert sorted(got) == sorted(expected)
    for image_id, row in got.items():
        assert abs(float(row["mel"]) - float(expected[image_id]["mel"])) < 1e-5
        assert row["predicted"] == max(("mel", "nv"), key=lambda c: float(row[c])) and row["error"] == ""
        assert row["decision"] == expected[image_id]["decision"]  # the run's stored threshold, applied again
        assert float(row["ood_score"]) >= 0 and row["in_distribution"] in ("true", "false")
    assert FeatureStore(store).backbones == [TINY]
    # out of distribution: a uniform grey picture is no lesion; --abstain-ood makes flagged rows abstain
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.new("RGB", (224, 224), (128, 128, 128)).save(grey)
    code, stdout, err = cli(
        "predict", "--run", run, "--images", folder, grey, "--out", out, "--workers", "0", "--abstain-ood"
    )
    assert code == 0, err
    flagged = {i: r for i, r in _read_csv(out).items() if r["in_distribution"] == "false"}
    assert "grey" in flagged, _read_csv(out)["grey"]
    assert all(r["decision"] == "abstain" for r in flagged.values())
    assert all(r["decision"] != "abstain" for i, r in _read_csv(out).items() if i not in flagged)
    # the challenge's columns (every ISIC 2018 category) for its scorer, nothing else
    isic = tmp_path / "isic.csv"
    code, _, err = cli("predict", "--run", run, "--images", folder, "--out", isic, "--workers", "0", "--format", "isic")
    assert code == 0, err
    lines = isic.read_text().splitlines()
    assert lines[0] == "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC" and len(lines) == 1 + len(expected)
    row = _read_csv(isic)[next(iter(expected))]
    assert float(row["MEL"]) == pytest.approx(float(got[row["image"]]["mel"]), abs=1e-6) and row["BCC"] == "0.000000"
    # --strict: any failure is status 1; nothing classified is status 1 whatever the options
    code, _, _ = cli("predict", "--run", run, "--images", folder, "--out", out, "--workers", "0", "--strict")
    assert code == 1
    code, _, err = cli("predict", "--run", run, "--images", tmp_path / "nope.jpg", "--out", out, "--workers", "0")
    assert code == 1 and "nope: missing file" in err and "no image was classified" in err
    assert _read_csv(out)["nope"]["error"] == "missing file"
    (tmp_path / "empty").mkdir()
    code, _, err = cli("predict", "--run", run, "--images", tmp_path / "empty", "--out", out)
    assert code == 1 and "a folder with no images" in err
    # a manifest CSV: its paths relative to --root (else to its own folder, where they do not resolve)
    listing = tmp_path / "lists" / "new.csv"
    listing.parent.mkdir()
    listing.write_text("path\n" + "".join(f"new/{i}.png\n" for i in expected))
    code, _, err = cli("predict", "--run", run, "--images", listing, "--out", out, "--workers", "0")
    assert code == 1 and err.count("missing file") == len(expected)
    code, _, err = cli("predict", "--run", run, "--images", listing, "--root", tmp_path, "--out", out, "--workers", "0")
    assert code == 0, err
    assert sorted(_read_csv(out)) == sorted(expected)


def test_several_backbones_side_by_side(tmp_path, cli):
    from features.store import Samples, write_arrays

    rng = np.random.default_rng(0)
    n = 240  # 60 lesions of each class: 12 in the test part
    labels = [("mel", "nv")[(i // 2) % 2] for i in range(n)]
    samples = Samples(
        image_id=[f"i{i}" for i in range(n)],
        path=[f"i{i}.jpg" for i in range(n)],
        label=labels,
        group=[f"L{i // 2}" for i in range(n)],
        sha256=[""] * n,
        meta={},
    )
    signal = np.array([1.0 if label == "mel" else -1.0 for label in labels])[:, None]
    a = (rng.normal(0, 1, (n, 6)) + signal).astype(np.float32)
    b = rng.normal(0, 1, (n, 10)).astype(np.float32)
    write_arrays(
        tmp_path / "two.h5",
        samples,
        {"a": (a, {"fingerprint": "fa", "identity": "{}"}), "b": (b, {"fingerprint": "fb", "identity": "{}"})},
    )
    code, _, err = cli("fit", "--features", tmp_path / "two.h5", "--head", "linear", "--out", tmp_path / "r", *FAST)
    assert code == 2 and "a, b" in err and "--backbone" in err  # two backbones: say which
    code, _, err = cli(
        "fit",
        "--features",
        tmp_path / "two.h5",
        "--head",
        "linear",
        "--backbone",
        "a,b",
        "--out",
        tmp_path / "r",
        *FAST,
    )
    assert code == 0, err
    run = load_run(tmp_path / "r")
    assert run.inputs.backbones == ("a", "b") and run.head.coef_.shape[1] == 16
    assert set(run.card["extraction"]) == {"a", "b"}


def test_a_study_in_sqlite_with_parallel_trials(tmp_path, store, cli):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    code, _, err = cli(
        "fit",
        "--features",
        store,
        "--head",
        "linear",
        "--out",
        tmp_path / "r",
        "--storage",
        url,
        "--study",
        "shared",
        "--n-jobs",
        "2",
        "--folds",
        "3",
        "--trials",
        "4",
        "--timeout",
        "600",
    )
    assert code == 0, err
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(study.trials) == 4
    assert not (tmp_path / "r" / "study.journal").exists()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["storage"] == url


def test_evaluate_never_scores_images_the_run_has_seen(tmp_path, store, cli):
    """A copy (or re-extraction) of the run's own store is not external data: only its unseen rows count."""
    from features.store import Samples, write_arrays

    run = tmp_path / "run"
    assert cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)[0] == 0
    copy = tmp_path / "copy.h5"
    shutil.copyfile(store, copy)
    code, out, err = cli("evaluate", "--run", run, "--features", copy)
    assert code == 0, err
    metrics = json.loads((run / "evaluations" / "copy" / "metrics.json").read_text())
    own = json.loads((run / "metrics.json").read_text())["test"]
    seen = int(np.sum(read_run_split(run).seen))
    assert metrics["n"] == own["n"] and metrics["balanced_accuracy"] == pytest.approx(own["balanced_accuracy"])
    assert metrics["excluded"] == {"trained or tuned on (same image id)": seen}
    assert f"{seen} images trained or tuned on" in out
    # the same files under other ids (same SHA-256) are seen too; a store of nothing else: exit 2
    source = FeatureStore(store)
    samples, split = source.samples(), read_run_split(run)
    study = np.isin(samples.image_id, split.image_id[split.seen])
    renamed = Samples(
        image_id=[f"re{i}" for i, s in zip(samples.image_id, study) if s],
        path=[p for p, s in zip(samples.path, study) if s],
        label=[v for v, s in zip(samples.label, study) if s],
        group=[g for g, s in zip(samples.group, study) if s],
        sha256=[h for h, s in zip(samples.sha256, study) if s],
        meta={},
    )
    attrs = source.backbone_attrs("fake")
    write_arrays(tmp_path / "renamed.h5", renamed, {"fake": (source.embeddings("fake")[study], attrs)})
    code, _, err = cli("evaluate", "--run", run, "--features", tmp_path / "renamed.h5")
    assert code == 2 and f"all {seen} labelled images were trained or tuned on" in err
