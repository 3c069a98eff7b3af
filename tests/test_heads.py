"""classify/heads.py: the scikit-learn contract, string labels, balanced weights, save/load, report, registry."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
import xgboost as xgb
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score, recall_score, roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import estimator_checks_generator

from conftest import synthetic_store

from classify.heads import HEADS, HeadError, KnnHead, LinearHead, MLPHead, XGBoostHead, inner_split, get_head

optuna.logging.set_verbosity(optuna.logging.WARNING)

SMALL = {
    "linear": {},
    "mlp": {"hidden": (32,), "epochs": 30, "patience": 5, "lr": 5e-3, "device": "cpu"},
    # n_jobs=1: xgboost's and torch's OpenMP threads fight on a small machine (100x slower)
    "xgboost": {"n_estimators": 50, "early_stopping_rounds": 10, "device": "cpu", "n_jobs": 1},
    "knn": {"n_neighbors": 5},
}
NAMES = list(SMALL)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny MLPs run several times faster on one thread than with threads fighting over two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(name: str, **overrides):
    return HEADS[name](**{**SMALL[name], **overrides})


def blobs(n_per_class, classes, dim=10, separation=6.0, seed=0, noise=None):
    """Gaussian blobs, one per class, centred at norm `separation` in random directions (from `seed`),
    unit noise (from `noise`, default `seed`: another `noise` draws a fresh sample of the same problem)."""
    centres = np.random.default_rng(seed).normal(0, 1, (len(classes), dim))
    centres *= separation / np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, 0 if noise is None else noise + 1])
    counts = n_per_class if isinstance(n_per_class, (list, tuple)) else [n_per_class] * len(classes)
    x = np.concatenate([centres[k] + rng.normal(0, 1, (n, dim)) for k, n in enumerate(counts)])
    y = np.concatenate([[c] * n for c, n in zip(classes, counts)]).astype(object)
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


# ------------------------------------------------------------------------------- sklearn contract


@pytest.mark.parametrize("name", NAMES)
def test_clone_and_get_params_round_trip_and_fit_leaves_params_alone(name):
    head = small(name, random_state=3)
    params = head.get_params()
    assert params["random_state"] == 3 and params["class_weight"] == "balanced"
    twin = clone(head)
    assert twin is not head and twin.get_params() == params
    assert type(head)(**params).get_params() == params

    x, y = blobs(60, ["a", "b"], seed=1)
    assert head.fit(x, y) is head
    assert head.get_params() == params  # fit must not rewrite its parameters
    fresh = clone(head)
    assert fresh.get_params() == params
    assert not hasattr(fresh, "classes_")  # a clone is unfitted


@pytest.mark.parametrize("name", NAMES)
def test_works_in_a_pipeline_and_with_cross_val_predict(name):
    x, y = blobs(50, ["nv", "bcc", "mel"], seed=2)
    pipe = Pipeline([("scale", StandardScaler()), ("head", small(name))])
    pipe.fit(x, y)
    assert list(pipe.classes_) == ["bcc", "mel", "nv"]
    assert np.mean(pipe.predict(x) == y) > 0.9

    groups = np.arange(len(y)) // 2
    proba = cross_val_predict(small(name), x, y, groups=groups, cv=GroupKFold(3), method="predict_proba")
    assert proba.shape == (len(y), 3)
    # cross_val_predict orders columns by the sorted labels: argmax must recover them
    assert np.mean(np.array(["bcc", "mel", "nv"])[proba.argmax(1)] == y) > 0.85


@pytest.mark.parametrize("name", NAMES)
def test_three_string_classes_columns_follow_classes(name):
    # first appearance order differs from sorted order, so a column mix-up shows
    x, y = blobs(60, ["nv", "mel", "bcc"], seed=4)
    head = small(name).fit(x, y)
    assert list(head.classes_) == ["bcc", "mel", "nv"]
    xt, yt = blobs(40, ["nv", "mel", "bcc"], seed=4, noise=1)  # same problem, fresh rows
    proba = head.predict_proba(xt)
    assert proba.shape == (len(yt), 3)
    assert np.mean(head.classes_[proba.argmax(1)] == yt) > 0.9
    predicted = head.predict(xt)
    assert set(predicted) <= {"bcc", "mel", "nv"}
    assert np.array_equal(predicted, head.classes_[proba.argmax(1)])


@pytest.mark.parametrize("name", NAMES)
def test_binary_string_labels_second_column_is_the_second_sorted_class(name):
    x, y = blobs(80, ["nv", "mel"], seed=5)
    head = small(name).fit(x, y)
    assert list(head.classes_) == ["mel", "nv"]
    proba = head.predict_proba(x)
    assert proba.shape == (len(y), 2)
    # the 'nv' column must be the high one on 'nv' rows
    assert np.mean((proba[:, 1] > 0.5) == (y == "nv")) > 0.95
    assert proba[y == "nv", 1].mean() > 0.5 > proba[y == "mel", 1].mean()


@pytest.mark.parametrize("name", NAMES)
def test_fit_is_deterministic_for_a_fixed_random_state(name):
    x, y = blobs(60, ["a", "b", "c"], separation=2.0, seed=6)
    groups = np.arange(len(y)) // 3
    p1 = small(name).fit(x, y, groups=groups).predict_proba(x)
    p2 = small(name).fit(x, y, groups=groups).predict_proba(x)
    np.testing.assert_allclose(p1, p2, atol=1e-6)


def test_linear_sample_weight_zero_equals_dropping_the_rows():
    x, y = blobs(60, ["a", "b"], separation=2.0, seed=7)
    w = np.ones(len(y))
    w[::3] = 0.0
    kept = w > 0
    weighted = LinearHead(C=1.0, class_weight=None).fit(x, y, sample_weight=w)
    dropped = LinearHead(C=1.0, class_weight=None).fit(x[kept], y[kept])
    unweighted = LinearHead(C=1.0, class_weight=None).fit(x, y)
    # the weighted fit standardises with all rows, the other with the kept ones: compare predictions
    assert not np.allclose(weighted.predict_proba(x), unweighted.predict_proba(x), atol=1e-3)
    assert np.mean(weighted.predict(x) == dropped.predict(x)) > 0.95


def test_inner_validation_split_keeps_lesions_together():
    codes = np.tile([0, 1], 100)
    groups = np.repeat(np.arange(50), 4)  # 50 lesions of 4 images
    train, val = inner_split(codes, groups, 0.2, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    assert not set(groups[train]) & set(groups[val])
    assert 0.1 <= len(val) / 200 <= 0.3
    # without groups: a stratified split of the rows
    train, val = inner_split(codes, None, 0.2, seed=0)
    assert len(val) == 40 and np.bincount(codes[val]).tolist() == [20, 20]


# ------------------------------------------------------------------------------- scikit-learn's own checks

CHECKED = {
    "linear": {},
    # enough epochs for check_classifiers_train's accuracy bar on its small blobs
    "mlp": {"hidden": (16,), "epochs": 40, "patience": 5, "lr": 1e-2, "batch_size": 32, "device": "cpu"},
    "xgboost": {"n_estimators": 10, "early_stopping_rounds": 5, "device": "cpu", "n_jobs": 1},
    "knn": {},
}
COUNTS_ROWS = "'balanced' class weights count rows (as scikit-learn's class_weight does), not weights"
EXPECTED_FAILED = {
    "linear": {
        "check_sample_weight_equivalence_on_dense_data": f"{COUNTS_ROWS}; the standardisation is unweighted",
    },
    "mlp": {
        "check_sample_weight_equivalence_on_dense_data": f"{COUNTS_ROWS}; the inner validation split is of rows",
        "check_class_weight_classifiers": "the kept epoch is the one of best balanced accuracy, by design",
    },
    "xgboost": {
        "check_sample_weight_equivalence_on_dense_data": f"{COUNTS_ROWS}; the inner validation split is of rows",
    },
    "knn": {
        "check_sample_weight_equivalence_on_dense_data": (
            f"{COUNTS_ROWS}; a repeated row fills two of the k neighbour places, a row of weight 2 one"
        ),
    },
}


NOT_OUR_INPUTS = {
    "check_sample_weights_pandas_series": "pandas input: heads read NumPy arrays from the feature store",
    "check_classifier_data_not_an_array": "pandas input: heads read NumPy arrays from the feature store",
    "check_array_api_input": "the array API: heads are NumPy (and torch/XGBoost inside), not array-API generic",
}
"""Checks of inputs the heads never get, which scikit-learn itself skips without pandas or SCIPY_ARRAY_API;
left out, so that every check that is run can fail (CI fails on a skipped test)."""


def _check_name(check) -> str:
    return getattr(check, "func", check).__name__


def _sklearn_checks() -> list:
    params = []
    for name in NAMES:
        generated = estimator_checks_generator(
            HEADS[name](**CHECKED[name]),
            legacy=True,
            expected_failed_checks=EXPECTED_FAILED[name],
            mark="xfail",
            xfail_strict=True,
        )
        for item in generated:
            values, marks = (item.values, item.marks) if hasattr(item, "values") else (item, ())
            if _check_name(values[1]) not in NOT_OUR_INPUTS:
                params.append(pytest.param(*values, marks=marks, id=f"{name}-{_check_name(values[1])}"))
    return params


@pytest.mark.parametrize("estimator, check", _sklearn_checks())
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_every_head_is_checked_by_scikit_learn():
    assert set(CHECKED) == set(EXPECTED_FAILED) == set(HEADS)


# ------------------------------------------------------------------------------- parameter checks


@pytest.mark.parametrize(
    "name,param,value,allowed",
    [
        ("mlp", "dropout", 2, "a number in [0, 1)"),
        ("mlp", "lr", -1e-3, "a number > 0"),
        ("mlp", "hidden", (64, 0), "a tuple of hidden layer widths, each an integer >= 1"),
        ("mlp", "epochs", 2.5, "an integer >= 1"),
        ("mlp", "device", "tpu", "auto, cpu, cuda or cuda:N"),
        ("linear", "C", 0.0, "a number > 0"),
        ("linear", "class_weight", "weighted", '"balanced", None, or a dict of class label -> weight >= 0'),
        ("xgboost", "learning_rate", -0.1, "a number in (0, 1]"),
        ("xgboost", "subsample", 1.5, "a number in (0, 1]"),
        ("xgboost", "max_bin", 1, "an integer >= 2"),
        ("xgboost", "val_fraction", 1.0, "a number in (0, 1)"),
        ("xgboost", "random_state", -1, "an integer in [0, 4294967295]"),
        ("knn", "n_neighbors", 0, "an integer >= 1"),
        ("knn", "metric", "manhattan", "cosine or euclidean"),
        ("knn", "weights", "gaussian", "uniform or distance"),
    ],
)
def test_a_bad_parameter_is_one_line_naming_it_and_its_range(name, param, value, allowed):
    head = small(name, **{param: value})  # scikit-learn's rule: __init__ only stores
    x, y = blobs(10, ["a", "b"])
    with pytest.raises(HeadError) as info:
        head.fit(x, y)
    assert not hasattr(head, "classes_")  # refused before it learnt anything
    message = str(info.value)
    assert message == f"{name} head: {param}={value!r} is not allowed; {param} must be {allowed}"
    assert "\n" not in message


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_search_space_draws_are_allowed(name):
    cls = HEADS[name]
    assert set(cls.PARAMS) == set(cls().get_params())  # every parameter has its rule
    cls().check_params()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    for _ in range(20):
        cls(**cls.search_space(study.ask())).check_params()


def test_head_options_are_keyword_only():
    with pytest.raises(TypeError):
        MLPHead((32,))


@pytest.mark.parametrize("name", NAMES)
def test_an_unfitted_head_says_so(name):
    x, _ = blobs(5, ["a", "b"])
    for method in ("predict_proba", "predict"):
        with pytest.raises(NotFittedError, match=f"This {type(small(name)).__name__} instance is not fitted yet"):
            getattr(small(name), method)(x)


@pytest.mark.parametrize("name", NAMES)
def test_class_weights_by_label_move_the_predictions(name):
    x, y = blobs(80, ["nv", "mel"], separation=1.0, seed=17)  # overlapping: the weights decide the border
    plain = small(name, class_weight=None).fit(x, y).predict(x)
    heavy = small(name, class_weight={"mel": 20.0, "nv": 1.0}).fit(x, y).predict(x)
    assert np.mean(heavy == "mel") > np.mean(plain == "mel") + 0.1


@pytest.mark.parametrize("name", NAMES)
def test_bad_sample_weights_are_refused(name):
    x, y = blobs(10, ["a", "b"])
    with pytest.raises(HeadError, match="every sample_weight is zero"):
        small(name).fit(x, y, sample_weight=np.zeros(len(y)))
    with pytest.raises(HeadError, match="finite and >= 0"):
        small(name).fit(x, y, sample_weight=-np.ones(len(y)))


# ------------------------------------------------------------------------------- class imbalance


def imbalanced(n_major, n_minor, seed, noise=None):
    return blobs([n_major, n_minor], ["nv", "mel"], dim=10, separation=2.0, seed=seed, noise=noise)


@pytest.mark.parametrize("name", NAMES)
def test_balanced_class_weight_raises_minority_recall(name):
    x, y = imbalanced(570, 30, seed=11)
    xt, yt = imbalanced(300, 300, seed=11, noise=1)  # same problem, fresh balanced evaluation rows
    scores = {}
    for weight in ("balanced", None):
        head = small(name, class_weight=weight).fit(x, y)
        predicted = head.predict(xt)
        scores[weight] = (
            recall_score(yt, predicted, pos_label="mel"),
            balanced_accuracy_score(yt, predicted),
        )
    (rec_bal, ba_bal), (rec_none, ba_none) = scores["balanced"], scores[None]
    assert rec_bal > rec_none + 0.2, scores
    assert ba_bal > ba_none + 0.05, scores
    assert rec_bal > 0.3, scores


# ------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_gives_the_same_probabilities(name, tmp_path):
    x, y = blobs(50, ["nv", "mel", "bcc"], separation=3.0, seed=8)
    head = small(name).fit(x, y)
    files = head.save(tmp_path)
    assert files and all((tmp_path / f).is_file() for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)

    if name == "linear":
        assert files == ["head.npz"]
        with np.load(tmp_path / "head.npz", allow_pickle=False) as z:
            assert set(z.files) >= {"coef", "intercept", "mean", "scale"}
            assert all(z[k].dtype.kind == "f" for k in z.files)  # reading every array needs no pickle
    elif name == "mlp":
        assert files == ["head.pt"]
        state = torch.load(tmp_path / "head.pt", map_location="cpu", weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    elif name == "knn":
        assert files == ["head.npz"]
        with np.load(tmp_path / "head.npz", allow_pickle=False) as z:
            assert set(z.files) == {"mean", "scale", "train", "codes", "weight"}
            assert all(z[k].dtype.kind in "fi" for k in z.files)  # reading every array needs no pickle
            assert z["train"].dtype == np.float32 and len(z["train"]) == len(z["codes"]) == len(y)
    else:
        assert "head.ubj" in files

    params = json.loads(json.dumps(head.get_params()))  # as a run folder would keep them
    loaded = type(head).load(tmp_path, params, [str(c) for c in head.classes_])
    assert list(loaded.classes_) == list(head.classes_)
    assert loaded.n_features_in_ == head.n_features_in_ == x.shape[1]  # predict checks the width
    xt, _ = blobs(20, ["nv", "mel", "bcc"], separation=3.0, seed=8, noise=1)
    np.testing.assert_allclose(loaded.predict_proba(xt), head.predict_proba(xt), atol=1e-6)
    assert np.array_equal(loaded.predict(xt), head.predict(xt))


def test_xgboost_load_keeps_the_early_stopping_iteration(tmp_path):
    x, y = blobs(60, ["a", "b"], separation=1.0, seed=10)
    head = XGBoostHead(n_estimators=200, early_stopping_rounds=5, learning_rate=0.3, device="cpu", n_jobs=1)
    head.fit(x, y)
    assert head.best_iteration_ < 199  # stopped early, so the later trees must be ignored
    dm = xgb.DMatrix(x)
    best = head.booster_.predict(dm, iteration_range=(0, head.best_iteration_ + 1))
    every = head.booster_.predict(dm)
    assert not np.allclose(best, every, atol=1e-4)
    np.testing.assert_allclose(head.predict_proba(x)[:, 1], best, atol=1e-6)
    head.save(tmp_path)
    loaded = XGBoostHead.load(tmp_path, head.get_params(), list(head.classes_))
    assert loaded.best_iteration_ == head.best_iteration_
    np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x), atol=1e-6)


# ------------------------------------------------------------------------------- report callback


def test_mlp_reports_every_epoch_with_increasing_steps():
    x, y = blobs(60, ["a", "b"], separation=1.0, seed=12)  # hard: validation scores go up and down
    calls = []
    head = MLPHead(hidden=(16,), epochs=20, patience=100, lr=5e-3, device="cpu").fit(
        x, y, report=lambda step, value: calls.append((step, value))
    )
    steps = [s for s, _ in calls]
    assert steps == list(range(20))  # no early stop with patience 100: every epoch
    values = [v for _, v in calls]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values)  # the best so far never goes down
    assert values[-1] == pytest.approx(head.best_val_score_)
    best = head.best_epoch_
    assert best < 19 and values[best] == values[-1] and all(v < values[-1] for v in values[:best])


def test_mlp_report_stops_with_early_stopping():
    x, y = blobs(60, ["a", "b"], separation=8.0, seed=13)  # perfect at once, then never better
    calls = []
    MLPHead(hidden=(16,), epochs=100, patience=3, device="cpu").fit(x, y, report=lambda s, v: calls.append(s))
    assert calls == list(range(len(calls)))
    assert len(calls) < 100


def test_xgboost_reports_every_report_every_rounds():
    x, y = blobs(80, ["a", "b", "c"], separation=2.0, seed=14)
    calls = []
    head = XGBoostHead(n_estimators=45, early_stopping_rounds=1000, device="cpu", n_jobs=1)
    head.fit(x, y, report=lambda step, value: calls.append((step, value)))
    steps = [s for s, _ in calls]
    every = XGBoostHead.REPORT_EVERY
    assert steps == list(range(len(steps)))
    assert len(steps) == -(-45 // every)  # rounds 0, 10, 20, 30, 40
    values = [v for _, v in calls]
    assert all(v <= 0 for v in values)  # minus a log loss
    assert values == sorted(values)  # best so far: never decreases
    assert values[-1] > values[0]  # it learned something


def test_linear_never_reports():
    x, y = blobs(30, ["a", "b"], seed=15)
    calls = []
    LinearHead().fit(x, y, report=lambda s, v: calls.append(s))
    assert calls == []


# ------------------------------------------------------------------------------- search space


@pytest.mark.parametrize(
    "name,fixed",
    [
        ("linear", {"C": 0.5}),
        ("mlp", {"width": 256, "layers": 2, "dropout": 0.1, "weight_decay": 1e-3, "lr": 1e-3}),
        (
            "xgboost",
            {
                "max_depth": 3,
                "learning_rate": 0.1,
                "subsample": 0.9,
                "colsample_bytree": 0.5,
                "min_child_weight": 1.0,
                "reg_lambda": 2.0,
            },
        ),
        ("knn", {"n_neighbors": 15, "metric": "euclidean", "weights": "distance"}),
    ],
)
def test_search_space_builds_the_head(name, fixed):
    cls = get_head(name)
    params = cls.search_space(optuna.trial.FixedTrial(fixed))
    head = cls(**params)
    for key, value in params.items():
        assert head.get_params()[key] == value
    if name == "mlp":
        assert params["hidden"] == (256, 256)
    else:
        assert all(params[k] == v for k, v in fixed.items())

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        trial = study.ask()
        params = cls.search_space(trial)
        head = cls(**params)
        assert set(params) <= set(head.get_params())
        assert trial.params  # it really suggested something
        study.tell(trial, 0.5)


def test_search_space_params_fit_a_linear_head():
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    params = LinearHead.search_space(trial)
    assert 1e-4 <= params["C"] <= 10.0
    x, y = blobs(30, ["a", "b"], seed=16)
    assert LinearHead(**params).fit(x, y).predict(x).shape == (60,)


# ------------------------------------------------------------------------------- knn


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("weights", ["uniform", "distance"])
def test_knn_learns_and_beats_the_majority_baseline(metric, weights):
    classes = ["nv", "mel", "bcc"]
    x, y = blobs([150, 40, 20], classes, separation=3.0, seed=20)  # imbalanced: nv is the majority
    xt, yt = blobs(60, classes, separation=3.0, seed=20, noise=1)  # same problem, fresh balanced rows
    head = KnnHead(n_neighbors=15, metric=metric, weights=weights).fit(x, y)
    proba = head.predict_proba(xt)
    assert np.all(proba > 0) and np.allclose(proba.sum(axis=1), 1.0)  # smoothed: no probability is 0
    assert roc_auc_score(yt, proba, multi_class="ovr", labels=list(head.classes_)) > 0.9
    predicted = head.predict(xt)
    majority = balanced_accuracy_score(yt, np.full(len(yt), "nv", dtype=object))
    assert majority == pytest.approx(1 / 3)
    assert balanced_accuracy_score(yt, predicted) > majority + 0.4
    assert np.mean(predicted == "bcc") > 0.25  # the rarest class is predicted, not outvoted


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_with_distance_weights_a_training_row_predicts_its_own_class(metric):
    x, y = blobs(60, ["nv", "mel"], separation=1.0, seed=21)  # overlapping: neighbours disagree
    uniform = KnnHead(n_neighbors=15, metric=metric).fit(x, y)
    assert np.mean(uniform.predict(x) == y) < 0.95  # so the next line says something
    distance = KnnHead(n_neighbors=15, metric=metric, weights="distance").fit(x, y)
    assert np.array_equal(distance.predict(x), y)


def test_knn_votes_are_weighted_by_inverse_class_frequency():
    # one feature, so standardising keeps the order: the 3 nearest rows to 0 are nv, nv, mel
    nv = [-0.1, 0.1, *np.linspace(50, 65, 16)]
    x = np.array([*nv, 0.25, -60.0], dtype=np.float32)[:, None]
    y = np.array(["nv"] * 18 + ["mel"] * 2, dtype=object)
    eps = KnnHead.SMOOTHING
    balanced = KnnHead(n_neighbors=3, metric="euclidean").fit(x, y)
    nv_vote, mel_vote = 2 * 20 / (2 * 18), 20 / (2 * 2)  # "balanced": n / (classes x rows of the class)
    mel = mel_vote / (nv_vote + mel_vote)
    np.testing.assert_allclose(balanced.predict_proba([[0.0]]), np.array([[mel + eps, 1 - mel + eps]]) / (1 + 2 * eps))
    assert balanced.predict([[0.0]])[0] == "mel"
    plain = KnnHead(n_neighbors=3, metric="euclidean", class_weight=None).fit(x, y)
    np.testing.assert_allclose(plain.predict_proba([[0.0]]), np.array([[1 / 3 + eps, 2 / 3 + eps]]) / (1 + 2 * eps))
    assert plain.predict([[0.0]])[0] == "nv"


def test_knn_with_more_neighbours_than_rows_votes_with_every_row():
    x, y = blobs([15, 5], ["nv", "mel"], seed=22)
    head = KnnHead(n_neighbors=100).fit(x, y)
    # every row votes, each class with the same total weight: a coin toss everywhere
    np.testing.assert_allclose(head.predict_proba(x), 0.5)


def test_knn_predicts_block_by_block_with_the_same_result(monkeypatch):
    x, y = blobs(50, ["nv", "mel", "bcc"], separation=2.0, seed=23)
    xt, _ = blobs(30, ["nv", "mel", "bcc"], separation=2.0, seed=23, noise=1)
    head = KnnHead(n_neighbors=7, metric="euclidean", weights="distance").fit(x, y)
    whole = head.predict_proba(xt)
    seen = []
    argpartition = np.argpartition

    def counting(distance, *args, **kwargs):
        seen.append(distance.shape)
        return argpartition(distance, *args, **kwargs)

    monkeypatch.setattr(KnnHead, "BLOCK_ELEMENTS", 7 * len(y))  # 7 queries a block
    monkeypatch.setattr(np, "argpartition", counting)
    blocked = head.predict_proba(xt)
    np.testing.assert_array_equal(blocked, whole)
    assert seen == [(7, len(y))] * 12 + [(6, len(y))]  # 90 queries


def test_knn_round_trip_keeps_sample_weights_and_the_metric(tmp_path):
    x, y = blobs(40, ["nv", "mel"], separation=1.5, seed=24)
    w = np.random.default_rng(0).uniform(0.2, 3.0, len(y))
    w[::5] = 0.0  # left out of the neighbours
    head = KnnHead(n_neighbors=9, metric="euclidean", weights="distance").fit(x, y, sample_weight=w)
    assert len(head.train_) == np.count_nonzero(w)
    head.save(tmp_path)
    for path in tmp_path.glob("*.npz"):
        np.load(path, allow_pickle=False).close()
    params = json.loads(json.dumps(head.get_params()))
    loaded = KnnHead.load(tmp_path, params, [str(c) for c in head.classes_])
    xt, _ = blobs(30, ["nv", "mel"], separation=1.5, seed=24, noise=1)
    np.testing.assert_array_equal(loaded.predict_proba(xt), head.predict_proba(xt))


def test_knn_fit_through_the_cli(tmp_path, cli):
    store = synthetic_store(tmp_path / "s.h5", n=240)
    run = tmp_path / "run"
    code, _, err = cli("fit", "--features", store, "--head", "knn", "--out", run, "--folds", "3", "--trials", "3")
    assert code == 0, err
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert test["balanced_accuracy"] > test["baseline"]["balanced_accuracy"]
    assert test["auc"] > 0.5
    config = json.loads((run / "config.json").read_text())
    assert config["head"] == "knn" and {"n_neighbors", "metric", "weights"} <= set(config["params"])


# ------------------------------------------------------------------------------- registry and errors


def test_registry_names_and_get_head():
    assert set(HEADS) == {"linear", "mlp", "xgboost", "knn"}
    assert get_head("linear") is LinearHead and get_head("mlp") is MLPHead and get_head("xgboost") is XGBoostHead
    assert get_head("knn") is KnnHead
    for name, cls in HEADS.items():
        assert cls.name == name


def test_unknown_head_error_lists_the_known_ones():
    with pytest.raises(HeadError) as info:
        get_head("svm")
    message = str(info.value)
    assert "svm" in message
    for name in ("linear", "mlp", "xgboost", "knn"):
        assert name in message


@pytest.mark.parametrize("name", NAMES)
def test_a_single_class_is_refused(name):
    x = np.random.default_rng(0).normal(size=(20, 5))
    with pytest.raises(HeadError, match="two classes"):
        small(name).fit(x, np.array(["nv"] * 20, dtype=object))
