"""Out-of-distribution flags: far-away rows flagged, about (100 - percentile) % of fresh in-distribution
rows flagged, saved as data, and written into a run by `fit`."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from classify.ood import OOD_FILE, OOD_PERCENTILE, Ood, fit_ood, out_of_fold_threshold
from classify.runs import HEAD_FOLDER, RunError, load_run
from conftest import synthetic_store


def _classes(rng: np.random.Generator, n: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian classes with their own means and one correlated covariance."""
    mix = np.eye(dim) + 0.3 * np.random.default_rng(7).normal(size=(dim, dim))
    y = np.array(["a", "b"])[rng.integers(0, 2, n)]
    centre = np.where(y == "a", 0.0, 3.0)[:, None] * np.ones(dim)
    return centre + rng.normal(size=(n, dim)) @ mix, y


def test_flags_far_rows_and_about_the_percentiles_share_of_fresh_ones():
    rng = np.random.default_rng(0)
    x, y = _classes(rng, 2000)
    folds = np.arange(len(y)) % 5
    ood = fit_ood(x, y, threshold=out_of_fold_threshold(x, y, folds))
    assert ood.classes == ["a", "b"] and ood.means.dtype == ood.precision.dtype == np.float32
    fresh, _ = _classes(rng, 4000)
    share = np.mean(~ood.in_distribution(ood.score(fresh)))
    expected = (100 - OOD_PERCENTILE) / 100
    assert expected / 3 <= share <= expected * 3
    far = rng.normal(size=(50, 8)) + 15.0  # beyond both classes
    assert not ood.in_distribution(ood.score(far)).any()
    # scored block by block: the same as at once
    assert np.allclose(ood.score(np.concatenate([fresh] * 3))[:10], ood.score(fresh[:10]))


def test_save_and_load_round_trip_without_pickle(tmp_path):
    rng = np.random.default_rng(1)
    x, y = _classes(rng, 300)
    ood = fit_ood(x, y, threshold=12.5)
    path = tmp_path / OOD_FILE
    ood.save(path)
    back = Ood.load(path)
    assert back.classes == ood.classes and back.threshold == 12.5
    assert np.array_equal(back.means, ood.means) and np.array_equal(back.precision, ood.precision)
    with np.load(path, allow_pickle=False) as z:  # every array is plain data
        assert all(z[k].dtype != object for k in z.files)
    # a file holding objects is refused, not unpickled
    np.savez(path, means=np.array([object()], dtype=object), precision=ood.precision, threshold=1.0, classes=["a"])
    with pytest.raises(ValueError):
        Ood.load(path)
    assert zipfile.is_zipfile(path)


def test_fit_writes_the_description_its_test_share_and_report(tmp_path, cli):
    store = synthetic_store(tmp_path / "s.h5", n=240, dim=8)
    run = tmp_path / "run"
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", run, "--folds", "3", "--trials", "1")
    assert code == 0, err
    test = json.loads((run / "metrics.json").read_text())["test"]
    ood = test["ood"]
    assert 0 <= ood["share"] <= 0.1 and ood["flagged"] == round(ood["share"] * ood["rows"]) and ood["threshold"] > 0
    assert "Out of distribution:" in (run / "report.md").read_text()
    loaded = load_run(run)
    assert OOD_FILE in loaded.card["files"] and (run / HEAD_FOLDER / OOD_FILE).is_file()
    assert loaded.ood is not None and loaded.ood.threshold == pytest.approx(ood["threshold"])
    assert loaded.ood.means.shape == (2, 8)
    (run / HEAD_FOLDER / OOD_FILE).write_bytes((run / HEAD_FOLDER / OOD_FILE).read_bytes() + b"x")
    with pytest.raises(RunError, match="SHA-256"):  # hashed and checked like the head's files
        load_run(run)
