"""Stores larger than the memory budget: float16 stores, `StoreRows` blocks, heads that learn from
blocks, the holdout protocol, evaluation block by block, and bench/scale.py's synthetic store writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from conftest import ROOT, synthetic_store

from classify.runs import read_run_split
from classify.fit import FitConfig, FitError, fit
from classify.heads import HEADS, MLPHead, XGBoostHead
from features.rows import StoreRows, load_inputs, machine_memory, parse_budget
from classify.metrics import macro_auc
from classify.predict import evaluate_run
from features.store import FeatureStore, Samples, write_arrays

TINY_BUDGET = "64KB"
"""Far below a 600 x 16 store's four float32 copies (150 KB): every test fit here streams."""


@pytest.fixture
def store(tmp_path) -> Path:
    return synthetic_store(tmp_path / "s.h5", n=600, dim=16, separation=3.0)


def _two_backbone_store(path: Path, n: int = 500) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(n, 8)).astype(np.float16)
    b = rng.normal(size=(n, 5)).astype(np.float32)
    samples = Samples(
        image_id=[f"i{k}" for k in range(n)],
        path=[f"i{k}.jpg" for k in range(n)],
        label=["mel" if k % 3 else "nv" for k in range(n)],
        group=[f"g{k // 2}" for k in range(n)],
        sha256=[""] * n,
    )
    attrs = lambda name: {"fingerprint": name, "identity": "{}", "weights": "none"}  # noqa: E731
    write_arrays(path, samples, {"a": (a, attrs("a")), "b": (b, attrs("b"))})
    return path, a, b


def test_float16_store_is_read_as_float32_in_blocks(tmp_path):
    path, a, b = _two_backbone_store(tmp_path / "two.h5")
    with h5py.File(path) as f:
        assert f["embeddings/a/data"].dtype == np.float16 and f["embeddings/b/data"].dtype == np.float32
    store = FeatureStore(path)
    assert store.embeddings("a").dtype == np.float32
    np.testing.assert_array_equal(store.embeddings("a"), a.astype(np.float32))
    rows = np.flatnonzero(np.arange(len(a)) % 7 != 3)
    blocks = list(store.read_rows(["a", "b"], rows, block_rows=40))
    assert all(len(block) < 2 * 40 for block in blocks)  # memory stays near a block
    np.testing.assert_array_equal(np.concatenate(blocks), np.hstack([a, b])[rows].astype(np.float32))
    with pytest.raises(ValueError, match="sorted"):
        next(store.read_rows(["a"], rows[::-1], 40))


def test_store_rows_are_the_in_memory_matrix_read_lazily(tmp_path):
    path, a, b = _two_backbone_store(tmp_path / "two.h5")
    store, backbones = FeatureStore(path), ("a", "b")
    keep = np.arange(len(a)) % 4 != 0
    meta = np.random.default_rng(2).normal(size=(len(a), 3)).astype(np.float32)
    dense = load_inputs(store, backbones, keep, meta, budget=2**30)
    lazy = load_inputs(store, backbones, keep, meta, budget=10_000)
    assert isinstance(dense, np.ndarray) and isinstance(lazy, StoreRows)
    assert lazy.shape == dense.shape == (keep.sum(), 8 + 5 + 3)
    np.testing.assert_allclose(np.concatenate(list(lazy.blocks())), dense)
    half = np.arange(len(lazy)) % 2 == 1
    np.testing.assert_allclose(np.concatenate(list(lazy[half].blocks())), dense[half])
    mean, std = lazy.moments()
    np.testing.assert_allclose(mean, dense.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(std, dense.std(axis=0), atol=1e-5)
    with pytest.raises(ValueError, match="sorted"):
        lazy[np.array([5, 2])]  # labels indexed the same way would no longer line up
    with pytest.raises(TypeError, match="streamed"):
        np.asarray(lazy)


def test_views_all_cannot_be_streamed(tmp_path):
    path = synthetic_store(tmp_path / "v.h5", n=200, dim=8, views=3)
    store = FeatureStore(path)
    with pytest.raises(Exception, match="--views all needs every view in memory"):
        load_inputs(store, ("fake",), np.ones(200, bool), np.zeros((200, 0)), 1000, all_views=True)


def test_memory_budget_parsing():
    assert parse_budget("1GB") == parse_budget("1GiB") == 2**30
    assert parse_budget("800MB") == 800 * 2**20
    assert parse_budget("50%") == machine_memory() // 2
    with pytest.raises(ValueError, match="--memory-budget"):
        parse_budget("lots")


@pytest.mark.parametrize("head", ["xgboost", "mlp"])
def test_streamed_fit_never_loads_the_whole_matrix(tmp_path, store, head, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a streamed fit read every embedding at once")

    monkeypatch.setattr(FeatureStore, "embeddings", refuse)
    fits, original = [], HEADS[head].fit
    monkeypatch.setattr(HEADS[head], "fit", lambda self, *a, **k: fits.append(1) or original(self, *a, **k))
    run = tmp_path / head
    metrics = fit(FitConfig(features=str(store), head=head, out=str(run), trials=2, memory_budget=TINY_BUDGET))
    assert len(fits) == 2  # one per trial: the final model is the best trial's own, not fitted again
    config = json.loads((run / "config.json").read_text())
    assert config["streamed"] is True and config["protocol"] == "holdout"
    assert metrics["test"]["auc"] > 0.9  # separable classes: a head that learnt nothing scores ~0.5
    assert metrics["cv"]["protocol"] == "holdout"
    split = read_run_split(run).fold
    assert metrics["cv"]["n"] == int(np.sum(split == 0))  # only fold 0 is scored
    study = json.loads((run / "study.json").read_text())
    assert len(study["best"]["fold_balanced_accuracy"]) == 1
    assert "holdout" in (run / "report.md").read_text()


def test_streamed_and_in_memory_heads_agree(store):
    x = FeatureStore(store).embeddings("fake")
    y = FeatureStore(store).column("label")
    groups = FeatureStore(store).column("group")
    lazy = load_inputs(FeatureStore(store), ("fake",), np.ones(len(x), bool), np.zeros((len(x), 0)), 4096)
    assert isinstance(lazy, StoreRows) and lazy.block_rows < len(x) // 2  # several blocks
    train, test = np.arange(len(x)) % 5 != 0, np.arange(len(x)) % 5 == 0
    for head_cls in (XGBoostHead, MLPHead):
        dense = head_cls(random_state=0).fit(x[train], y[train], groups=groups[train])
        streamed = head_cls(random_state=0).fit(lazy[train], y[train], groups=groups[train])
        a, b = dense.predict_proba(x[test]), streamed.predict_proba(lazy[test])
        auc_a, auc_b = macro_auc(y[test], a, list(dense.classes_)), macro_auc(y[test], b, list(streamed.classes_))
        assert auc_b > auc_a - 0.02, head_cls.name
        assert np.corrcoef(a[:, 1], b[:, 1])[0, 1] > 0.9, head_cls.name
        np.testing.assert_allclose(streamed.predict_proba(x[test]), b, atol=1e-6)  # blocks == whole


def test_the_linear_head_refuses_a_streamed_store_before_training(tmp_path, store):
    with pytest.raises(FitError, match="linear head needs all .* rows in memory.*mlp, xgboost.*--memory-budget"):
        fit(FitConfig(features=str(store), head="linear", out=str(tmp_path / "r"), memory_budget=TINY_BUDGET))
    assert not (tmp_path / "r" / "study.journal").exists()  # refused before any trial


def test_evaluate_block_by_block_matches_in_memory(tmp_path, store):
    run = tmp_path / "run"
    fit(FitConfig(features=str(store), head="mlp", out=str(run), trials=1))
    whole = evaluate_run(run)
    whole_csv = (run / "evaluations" / "test" / "predictions.csv").read_text()
    blocks = evaluate_run(run, memory_budget=TINY_BUDGET)
    assert blocks["auc"] == pytest.approx(whole["auc"]) and blocks["n"] == whole["n"]
    assert Path(blocks["folder"]) == run / "evaluations" / "test-2"  # a new folder: the first one stays
    rows = [line.split(",") for line in (Path(blocks["folder"]) / "predictions.csv").read_text().splitlines()]
    expected = [line.split(",") for line in whole_csv.splitlines()]
    assert [r[0] for r in rows] == [r[0] for r in expected]
    assert rows[0][-2:] == ["predicted", "decision"]
    np.testing.assert_allclose(
        np.array([r[1:-2] for r in rows[1:]], float), np.array([r[1:-2] for r in expected[1:]], float), atol=2e-6
    )


@pytest.mark.parametrize("structure", ["factors", "isotropic"])
def test_bench_writes_a_synthetic_store_in_the_real_format(tmp_path, structure):
    out = tmp_path / "syn.h5"
    command = [
        sys.executable,
        str(ROOT / "bench" / "scale.py"),
        "--synthetic-store",
        str(out),
        "--rows",
        "3000",
        "--dim",
        "96",
        "--structure",
        structure,
    ]
    subprocess.run(command, check=True, capture_output=True)
    store = FeatureStore(out)
    assert len(store) == 3000 and store.backbones == ["synthetic"] and store.dim("synthetic") == 96
    with h5py.File(out) as f:
        assert f["embeddings/synthetic/data"].dtype == np.float16
    labels, groups = store.column("label"), store.column("group")
    assert set(labels) == {"mel", "nv"} and 0.1 < np.mean(labels == "mel") < 0.3
    assert 1000 < len(set(groups)) < 3000
    for g in np.unique(groups)[:200]:
        assert len(set(labels[groups == g])) == 1  # a lesion has one diagnosis
    x = np.column_stack([store.embeddings("synthetic").astype(np.float64), np.ones(len(labels))])
    score = x @ np.linalg.lstsq(x, labels == "mel", rcond=None)[0]
    assert roc_auc_score(labels == "mel", score) > 0.75  # class structure (in-sample: a check, not a figure)
    x = x[:, :-1]
    share = np.linalg.svd(x - x.mean(axis=0), compute_uv=False) ** 2
    top = share[:32].sum() / share.sum()
    assert top > 0.6 if structure == "factors" else top < 0.6  # real embeddings: 0.70 in 32 components


def test_fit_and_evaluate_of_xgboost_run_without_torch(tmp_path, store):
    """torch adds ~0.5 GB resident: a store near the budget must be fittable without it."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import cli
assert cli.main(["fit", "--features", {str(store)!r}, "--head", "xgboost", "--trials", "1",
                 "--memory-budget", {TINY_BUDGET!r}, "--out", {str(tmp_path / "run")!r}]) == 0
assert cli.main(["evaluate", "--run", {str(tmp_path / "run")!r}, "--memory-budget", {TINY_BUDGET!r}]) == 0
assert "torch" not in sys.modules, "torch was imported"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
