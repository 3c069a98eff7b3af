"""Heads: classifiers on embeddings with the scikit-learn contract, their search spaces and safe files.

Each head stores only its parameters in `__init__`, learns in `fit` (returning self), exposes
`classes_` and `predict_proba` columns in that order, so `clone`, `Pipeline` and
`cross_val_predict` work. All weight classes as "balanced" by default and handle any number of
classes. `fit` also takes the lesion `groups` (for a grouped inner validation split) and `report`, a
callback `report(step, value)` called per epoch or boosting round with a higher-is-better value, so
that an Optuna pruner can stop a bad trial early.

Streamed inputs (`StoreRows`, a store larger than the memory budget) are learnt from in blocks by
the heads that can (XGBoost through its external-memory pages, the MLP through a block loader); the
linear and kNN heads say they cannot.

torch is imported where the MLP needs it, not here: it adds about 0.5 GB of resident memory (and
seconds of start-up) that linear and XGBoost fits do without, which matters for stores near the budget.

Saved heads hold data, not programs: arrays in `.npz` (no pickle), tensors loaded with
`weights_only`, XGBoost's own UBJSON; the run folder records each file's SHA-256 (classify/runs.py).

Parameters are checked when `fit` starts (scikit-learn's rule: `__init__` and `set_params` only
store), each against the values it allows (`PARAMS`), so that a bad value fails as one `HeadError`
naming the parameter and its range rather than deep inside torch or XGBoost. Inputs are checked with
scikit-learn's `validate_data` (shape, finite values, as many labels as rows, the same number of
columns at predict as at fit); streamed rows are checked for their width and length only, since
reading them for anything else would cost a pass over the store.
"""

from __future__ import annotations

import gc
import json
import math
import numbers
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import numpy as np
import optuna
import xgboost as xgb
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupShuffleSplit, StratifiedShuffleSplit
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d, validate_data

from features.rows import StoreRows

if TYPE_CHECKING:
    import torch

__all__ = [
    "HEADS",
    "Allowed",
    "Head",
    "HeadError",
    "KnnHead",
    "LinearHead",
    "MLPHead",
    "Report",
    "XGBoostHead",
    "get_head",
    "inner_split",
    "integer",
    "number",
    "one_of",
    "register",
]

Report = Callable[[int, float], None]
"""report(step, value): an intermediate, higher-is-better score during fit."""


class HeadError(ValueError):
    """An unknown head, a head parameter outside its allowed values, bad training inputs, or a head file
    that cannot be used."""


@dataclass(frozen=True)
class Allowed:
    """The values one head parameter may take: `test(value)` says whether a value is one of them, `text`
    says which in words (it ends the error message)."""

    test: Callable[[object], bool]
    text: str


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Allowed:
    """A real number in a range; the ends are included unless `low_open` / `high_open`."""

    def test(value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    if high == math.inf:
        return Allowed(test, f"a number {'>' if low_open else '>='} {low:g}")
    return Allowed(test, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def integer(low: int, high: int | None = None) -> Allowed:
    """An integer of at least `low` (and at most `high`)."""

    def test(value: object) -> bool:
        return (
            isinstance(value, numbers.Integral)
            and not isinstance(value, bool)
            and low <= value <= (math.inf if high is None else high)
        )

    return Allowed(test, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]")


def _class_weight(value: object) -> bool:
    if value is None or (isinstance(value, str) and value == "balanced"):
        return True
    return isinstance(value, dict) and all(number(0).test(w) for w in value.values())


CLASS_WEIGHT = Allowed(_class_weight, '"balanced", None, or a dict of class label -> weight >= 0')
DEVICE = Allowed(
    lambda value: isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None,
    "auto, cpu, cuda or cuda:N",
)
SEED = integer(0, 2**32 - 1)
"""Seeds go to numpy's splitters, whose seeds are 32-bit."""
FRACTION = number(0, 1, low_open=True, high_open=True)


class Head(ClassifierMixin, BaseEstimator):
    """Shared behaviour: parameter and input checks, labels <-> indices, balanced weights, predict, saving."""

    name: ClassVar[str]
    streams: ClassVar[bool] = True
    """Whether `fit` learns from streamed rows (`StoreRows`) block by block."""
    differentiable: ClassVar[bool] = False
    """Whether the fitted head has a torch-module form (classify/finetune/model.py `head_module`), so that
    gradients reach the backbone through it: fine-tuning can start from it and Grad-CAM explains it
    (classify/explain.py; the others are explained by occlusion)."""
    PARAMS: ClassVar[dict[str, Allowed]]
    """Every parameter of `__init__` and the values it allows."""
    FITTED: ClassVar[tuple[str, ...]]
    """Attributes that exist once the head is fitted (or loaded)."""
    DTYPE: ClassVar[type] = np.float32
    """The dtype the head computes in: inputs are converted to it once, when they are checked."""

    def check_params(self) -> None:
        """Raise `HeadError` naming the first parameter whose value is not allowed, and what is."""
        for key, value in self.get_params(deep=False).items():
            allowed = self.PARAMS[key]
            if not allowed.test(value):
                raise HeadError(f"{self.name} head: {key}={value!r} is not allowed; {key} must be {allowed.text}")

    def _prepare(
        self, X: np.ndarray | StoreRows, y: np.ndarray, groups: np.ndarray | None, sample_weight: np.ndarray | None
    ) -> tuple[np.ndarray | StoreRows, np.ndarray, np.ndarray]:
        """Check the parameters and the inputs, learn `classes_` and `n_features_in_`; return X (as
        `DTYPE` where in memory), the class codes of y and the weight of each row."""
        self.check_params()
        if isinstance(X, StoreRows):
            y = column_or_1d(y, warn=True)
            check_consistent_length(X, y)
            self.n_features_in_ = X.shape[1]
        else:
            X, y = validate_data(self, X, y, dtype=self.DTYPE)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise HeadError(
                f"{self.name}: y has one class ({self.classes_[0]!r}); a classifier needs at least two classes"
            )
        if groups is not None and len(groups) != len(codes):
            raise HeadError(f"{self.name}: {len(groups)} groups for {len(codes)} rows; one group a row")
        weights = np.ones(len(codes)) if self.class_weight is None else compute_sample_weight(self.class_weight, y)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape != codes.shape:
                raise HeadError(f"{self.name}: sample_weight of shape {sample_weight.shape} for {len(codes)} rows")
            if not np.all(np.isfinite(sample_weight) & (sample_weight >= 0)):
                raise HeadError(f"{self.name}: sample_weight must be finite and >= 0")
            if not np.any(sample_weight):
                raise HeadError(f"{self.name}: every sample_weight is zero; at least one row must weigh more")
            weights = weights * sample_weight
        return X, codes, weights

    def predict(self, X: np.ndarray | StoreRows) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it says "not fitted" before `classes_` is looked up
        return self.classes_[np.argmax(proba, axis=1)]

    def predict_proba(self, X: np.ndarray | StoreRows) -> np.ndarray:
        """Class probabilities, columns in `classes_` order; streamed rows block by block."""
        check_is_fitted(self, self.FITTED)
        if isinstance(X, StoreRows):
            expected = getattr(self, "n_features_in_", X.shape[1])
            if X.shape[1] != expected:
                raise HeadError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting {expected}")
            return np.concatenate([self._proba(block) for block in X.blocks()])
        return self._proba(validate_data(self, X, reset=False, dtype=self.DTYPE))

    def _proba(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def search_space(cls, trial: optuna.Trial) -> dict:
        """The Optuna search space: parameter name -> suggested value."""
        raise NotImplementedError

    def save(self, folder: Path) -> list[str]:
        """Write the fitted head into `folder`; return the file names (the run records their hashes)."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: Path, params: dict, classes: list[str]) -> "Head":
        raise NotImplementedError


def inner_split(
    codes: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation rows for early stopping: lesion-grouped when groups are known."""
    if groups is not None and len(np.unique(groups)) >= 5:
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        return next(splitter.split(codes, codes, groups))
    splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    return next(splitter.split(codes, codes))


HEADS: dict[str, type[Head]] = {}
"""The head registry: name -> class."""


def register(cls: type[Head]) -> type[Head]:
    HEADS[cls.name] = cls
    return cls


def get_head(name: str) -> type[Head]:
    if name not in HEADS:
        raise HeadError(f"unknown head {name!r}; known: {', '.join(HEADS)}")
    return HEADS[name]


# ----------------------------------------------------------------------------------------- linear


@register
class LinearHead(Head):
    """Standardised multinomial logistic regression (L2, lbfgs)."""

    name = "linear"
    streams = False  # lbfgs needs every row in memory at once
    differentiable = True

    DTYPE = np.float64
    FITTED = ("coef_", "intercept_", "mean_", "scale_")
    PARAMS = {"C": number(0, low_open=True), "class_weight": CLASS_WEIGHT, "max_iter": integer(1), "random_state": SEED}

    def __init__(
        self,
        *,
        C: float = 0.01,
        class_weight: str | dict | None = "balanced",
        max_iter: int = 2000,
        random_state: int = 0,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial: optuna.Trial) -> dict:
        return {"C": trial.suggest_float("C", 1e-4, 10.0, log=True)}

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
        report: Report | None = None,
    ) -> "LinearHead":
        X, codes, weights = self._prepare(X, y, groups, sample_weight)
        self.mean_ = X.mean(axis=0)
        self.scale_ = X.std(axis=0)
        self.scale_[self.scale_ == 0] = 1.0
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.random_state)
        model.fit((X - self.mean_) / self.scale_, codes, sample_weight=weights)
        self.coef_, self.intercept_, self.n_iter_ = model.coef_, model.intercept_, model.n_iter_
        return self  # one convex solve: nothing to report before it ends

    def _proba(self, X: np.ndarray) -> np.ndarray:
        z = ((np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        if z.shape[1] == 1:  # binary: one logit for the second class
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.column_stack([1 - p, p])
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, folder: Path) -> list[str]:
        np.savez(folder / "head.npz", mean=self.mean_, scale=self.scale_, coef=self.coef_, intercept=self.intercept_)
        return ["head.npz"]

    @classmethod
    def load(cls, folder: Path, params: dict, classes: list[str]) -> "LinearHead":
        head = cls(**params)
        with np.load(folder / "head.npz", allow_pickle=False) as z:
            head.mean_, head.scale_, head.coef_, head.intercept_ = z["mean"], z["scale"], z["coef"], z["intercept"]
        head.classes_, head.n_features_in_ = np.array(classes, dtype=object), len(head.mean_)
        return head


# ----------------------------------------------------------------------------------------- mlp


def _device(device: str) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _xgboost_device(device: str) -> str:
    """XGBoost's device for `--device`: `auto` asks torch for a GPU, but only where an NVIDIA driver
    is present, so that a CPU-only XGBoost fit never imports torch."""
    if device != "auto":
        return device.split(":")[0]
    driver = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()
    return _device("auto").type if driver else "cpu"


def _mlp(n_in: int, hidden: tuple[int, ...], dropout: float, n_out: int) -> "torch.nn.Sequential":
    import torch

    layers: list[torch.nn.Module] = []
    for width in hidden:
        layers += [torch.nn.Linear(n_in, width), torch.nn.GELU(), torch.nn.Dropout(dropout)]
        n_in = width
    layers.append(torch.nn.Linear(n_in, n_out))
    return torch.nn.Sequential(*layers)


@register
class MLPHead(Head):
    """A PyTorch MLP on standardised inputs: AdamW, class-weighted cross-entropy, early stopping on
    the balanced accuracy of an inner (lesion-grouped) validation split; the best epoch is kept."""

    name = "mlp"
    differentiable = True
    FITTED = ("model_", "mean_", "scale_")
    PARAMS = {
        "hidden": Allowed(
            lambda value: isinstance(value, (tuple, list)) and all(integer(1).test(w) for w in value),
            "a tuple of hidden layer widths, each an integer >= 1",
        ),
        "dropout": number(0, 1, high_open=True),
        "weight_decay": number(0),
        "lr": number(0, low_open=True),
        "epochs": integer(1),
        "patience": integer(1),
        "batch_size": integer(1),
        "val_fraction": FRACTION,
        "class_weight": CLASS_WEIGHT,
        "device": DEVICE,
        "random_state": SEED,
    }

    def __init__(
        self,
        *,
        hidden: tuple[int, ...] = (512,),
        dropout: float = 0.3,
        weight_decay: float = 1e-3,
        lr: float = 1e-3,
        epochs: int = 100,
        patience: int = 10,
        batch_size: int = 128,
        val_fraction: float = 0.15,
        class_weight: str | dict | None = "balanced",
        device: str = "auto",
        random_state: int = 0,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.epochs = epochs
        self.patience = patience
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.device = device
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial: optuna.Trial) -> dict:
        width = trial.suggest_categorical("width", [256, 512, 1024])
        layers = trial.suggest_int("layers", 1, 2)
        return {
            "hidden": (width,) * layers,
            "dropout": trial.suggest_float("dropout", 0.0, 0.6),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
            "lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        }

    def fit(
        self,
        X: np.ndarray | StoreRows,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
        report: Report | None = None,
    ) -> "MLPHead":
        import torch

        X, codes, weights = self._prepare(X, y, groups, sample_weight)
        train, val = inner_split(codes, groups, self.val_fraction, self.random_state)
        device = _device(self.device)
        generator = torch.Generator().manual_seed(self.random_state)
        torch.manual_seed(self.random_state)
        if isinstance(X, StoreRows):
            train, val = np.sort(train), np.sort(val)
            self.mean_, scale = X.moments()
            self.scale_ = scale + 1e-6
            rows: _InMemory | _Streamed = _Streamed(X, codes, weights, self, device)
        else:
            self.mean_ = X.mean(axis=0)
            self.scale_ = X.std(axis=0) + 1e-6
            rows = _InMemory((X - self.mean_) / self.scale_, codes, weights, self.batch_size, device)
        model = _mlp(X.shape[1], tuple(self.hidden), self.dropout, len(self.classes_)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, waited = -1.0, None, 0
        for epoch in range(self.epochs):
            model.train()
            for xb, yb, wb in rows.batches(train, generator):
                loss = torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
                loss = (loss * wb).sum() / wb.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            model.eval()
            with torch.inference_mode():
                predicted = rows.predicted(model, val)
            score = float(balanced_accuracy_score(codes[val], predicted))
            if score > best:
                best, waited = score, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
            if report is not None:
                report(epoch, best)  # the best so far: what early stopping keeps, and less noisy
            if waited >= self.patience:
                break
        model.load_state_dict(best_state)
        self.model_ = model.cpu().eval()
        self.best_epoch_, self.best_val_score_ = epoch - waited, best
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy((np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_)
        with torch.inference_mode():
            return torch.softmax(self.model_(x), dim=1).numpy().astype(np.float64)

    def save(self, folder: Path) -> list[str]:
        import torch

        state = {f"model.{k}": v for k, v in self.model_.state_dict().items()}
        state["mean"], state["scale"] = torch.from_numpy(self.mean_), torch.from_numpy(self.scale_)
        torch.save(state, folder / "head.pt")
        return ["head.pt"]

    @classmethod
    def load(cls, folder: Path, params: dict, classes: list[str]) -> "MLPHead":
        import torch

        head = cls(**{**params, "hidden": tuple(params.get("hidden", (512,)))})
        state = torch.load(folder / "head.pt", map_location="cpu", weights_only=True)
        head.mean_, head.scale_ = state.pop("mean").numpy(), state.pop("scale").numpy()
        head.model_ = _mlp(len(head.mean_), head.hidden, head.dropout, len(classes))
        head.model_.load_state_dict({k[len("model.") :]: v for k, v in state.items()})
        head.model_.eval()
        head.classes_, head.n_features_in_ = np.array(classes, dtype=object), len(head.mean_)
        return head


class _InMemory:
    """The MLP's rows as tensors on the device: shuffled mini-batches, predictions in one go."""

    def __init__(
        self, x: np.ndarray, codes: np.ndarray, weights: np.ndarray, batch_size: int, device: "torch.device"
    ) -> None:
        import torch

        self.xs = torch.from_numpy(x).to(device)
        self.ys = torch.from_numpy(codes).long().to(device)
        self.ws = torch.from_numpy(weights).float().to(device)
        self.batch_size, self.device = batch_size, device

    def batches(self, rows: np.ndarray, generator: "torch.Generator") -> Iterator[tuple]:
        import torch

        order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=generator)].to(self.device)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield self.xs[batch], self.ys[batch], self.ws[batch]

    def predicted(self, model: "torch.nn.Module", rows: np.ndarray) -> np.ndarray:
        import torch

        return model(self.xs[torch.from_numpy(rows).to(self.device)]).argmax(1).cpu().numpy()


class _Streamed:
    """The MLP's rows read from disk: each epoch visits blocks of `block_rows` rows in a random order and
    shuffles the rows within a block (the usual streaming shuffle), so one or two blocks are in memory."""

    def __init__(
        self, x: StoreRows, codes: np.ndarray, weights: np.ndarray, head: "MLPHead", device: "torch.device"
    ) -> None:
        self.x, self.codes, self.weights, self.head, self.device = x, codes, weights, head, device

    def _tensor(self, block: np.ndarray) -> "torch.Tensor":
        import torch

        return torch.from_numpy((block - self.head.mean_) / self.head.scale_).to(self.device)

    def batches(self, rows: np.ndarray, generator: "torch.Generator") -> Iterator[tuple]:
        import torch

        size = self.head.batch_size
        chunks = [rows[k : k + self.x.block_rows] for k in range(0, len(rows), self.x.block_rows)]
        for c in torch.randperm(len(chunks), generator=generator).tolist():
            chunk = chunks[c]
            xs = self._tensor(np.concatenate(list(self.x[chunk].blocks())))
            ys = torch.from_numpy(self.codes[chunk]).long().to(self.device)
            ws = torch.from_numpy(self.weights[chunk]).float().to(self.device)
            order = torch.randperm(len(chunk), generator=generator).to(self.device)
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                yield xs[batch], ys[batch], ws[batch]

    def predicted(self, model: "torch.nn.Module", rows: np.ndarray) -> np.ndarray:
        return np.concatenate([model(self._tensor(b)).argmax(1).cpu().numpy() for b in self.x[rows].blocks()])


# ----------------------------------------------------------------------------------------- xgboost


@register
class XGBoostHead(Head):
    """Gradient-boosted `hist` trees with balanced sample weights and early stopping on an inner
    (lesion-grouped) validation split; on the GPU when there is one."""

    name = "xgboost"
    FITTED = ("booster_", "best_iteration_")
    PARAMS = {
        "n_estimators": integer(1),
        "max_depth": integer(1),
        "learning_rate": number(0, 1, low_open=True),
        "subsample": number(0, 1, low_open=True),
        "colsample_bytree": number(0, 1, low_open=True),
        "min_child_weight": number(0),
        "reg_lambda": number(0),
        "max_bin": integer(2),
        "early_stopping_rounds": integer(1),
        "val_fraction": FRACTION,
        "class_weight": CLASS_WEIGHT,
        "device": DEVICE,
        "n_jobs": integer(0),
        "random_state": SEED,
    }

    def __init__(
        self,
        *,
        n_estimators: int = 1000,
        max_depth: int = 4,
        learning_rate: float = 0.1,
        subsample: float = 0.8,
        colsample_bytree: float = 0.3,
        min_child_weight: float = 1.0,
        reg_lambda: float = 1.0,
        max_bin: int = 64,
        early_stopping_rounds: int = 30,
        val_fraction: float = 0.15,
        class_weight: str | dict | None = "balanced",
        device: str = "auto",
        n_jobs: int = 0,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.max_bin = max_bin
        self.early_stopping_rounds = early_stopping_rounds
        self.val_fraction = val_fraction
        self.class_weight = class_weight
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state

    REPORT_EVERY: ClassVar[int] = 10
    """Boosting rounds between intermediate reports to the pruner."""

    @classmethod
    def search_space(cls, trial: optuna.Trial) -> dict:
        return {
            "max_depth": trial.suggest_int("max_depth", 2, 8),
            "learning_rate": trial.suggest_float("learning_rate", 0.02, 0.3, log=True),
            "subsample": trial.suggest_float("subsample", 0.5, 1.0),
            "colsample_bytree": trial.suggest_float("colsample_bytree", 0.05, 0.6),
            "min_child_weight": trial.suggest_float("min_child_weight", 0.5, 20.0, log=True),
            "reg_lambda": trial.suggest_float("reg_lambda", 0.1, 20.0, log=True),
        }

    def _params(self) -> dict:
        binary = len(self.classes_) == 2
        device = _xgboost_device(self.device)
        return {
            "objective": "binary:logistic" if binary else "multi:softprob",
            "eval_metric": "logloss" if binary else "mlogloss",
            **({} if binary else {"num_class": len(self.classes_)}),
            "tree_method": "hist",
            "device": device,
            "max_depth": self.max_depth,
            "eta": self.learning_rate,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "min_child_weight": self.min_child_weight,
            "lambda": self.reg_lambda,
            "max_bin": self.max_bin,
            "seed": self.random_state,
            "nthread": self.n_jobs or os.cpu_count() or 1,
        }

    def fit(
        self,
        X: np.ndarray | StoreRows,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
        report: Report | None = None,
    ) -> "XGBoostHead":
        X, codes, weights = self._prepare(X, y, groups, sample_weight)
        train, val = inner_split(codes, groups, self.val_fraction, self.random_state)
        callbacks = [_Reporter(report, self.REPORT_EVERY)] if report is not None else []
        with tempfile.TemporaryDirectory(prefix="skinlesion-xgboost-") as pages:
            if isinstance(X, StoreRows):
                dtrain, dval = self._pages(X, codes, weights, np.sort(train), np.sort(val), folder=pages)
            else:
                dtrain = xgb.QuantileDMatrix(X[train], codes[train], weight=weights[train], max_bin=self.max_bin)
                dval = xgb.QuantileDMatrix(X[val], codes[val], weight=weights[val], ref=dtrain, max_bin=self.max_bin)
            self.booster_ = xgb.train(
                self._params(),
                dtrain,
                num_boost_round=self.n_estimators,
                evals=[(dval, "val")],
                early_stopping_rounds=self.early_stopping_rounds,
                callbacks=callbacks,
                verbose_eval=False,
            )
            del dtrain, dval
            if isinstance(X, StoreRows):
                # the page matrices release their files before the folder goes; a full collection
                # is not free in a process holding torch, and in-memory matrices have no files
                gc.collect()
        self.best_iteration_ = int(self.booster_.best_iteration)
        return self

    QUANTILE_BLOCKS: ClassVar[int] = 2
    """Streamed fits take the bin edges from a random sample of this many blocks of training rows."""

    def _pages(
        self, X: StoreRows, codes: np.ndarray, weights: np.ndarray, train: np.ndarray, val: np.ndarray, *, folder: str
    ) -> tuple[xgb.ExtMemQuantileDMatrix, xgb.ExtMemQuantileDMatrix]:
        """External-memory matrices: XGBoost quantises each block into a page file under `folder` and
        reads the pages back in every boosting round. The bin edges come from quantiles of a sample of
        the training rows: XGBoost's own sketch of 1,024 columns took 0.55-0.75 GB (docs/evaluation.md)."""
        sample = X[train].sample(self.QUANTILE_BLOCKS * X.block_rows, self.random_state)
        edges = np.quantile(sample, np.linspace(0, 1, self.max_bin + 1), axis=0).astype(np.float32)
        del sample
        ref = xgb.QuantileDMatrix(edges, np.zeros(len(edges)), max_bin=self.max_bin)
        threads = self.n_jobs or os.cpu_count() or 1

        def pages(rows: np.ndarray, name: str, reference: xgb.DMatrix) -> xgb.ExtMemQuantileDMatrix:
            source = _Pages(X[rows], codes[rows], weights[rows], os.path.join(folder, name))
            return xgb.ExtMemQuantileDMatrix(source, ref=reference, max_bin=self.max_bin, nthread=threads)

        dtrain = pages(train, "train", ref)
        return dtrain, pages(val, "val", dtrain)  # the validation pages take the training matrix's bins

    def _proba(self, X: np.ndarray) -> np.ndarray:
        p = self.booster_.predict(
            xgb.DMatrix(np.asarray(X, dtype=np.float32)), iteration_range=(0, self.best_iteration_ + 1)
        )
        return np.column_stack([1 - p, p]).astype(np.float64) if p.ndim == 1 else p.astype(np.float64)

    def save(self, folder: Path) -> list[str]:
        self.booster_.save_model(folder / "head.ubj")
        (folder / "head-xgboost.json").write_text(json.dumps({"best_iteration": self.best_iteration_}))
        return ["head.ubj", "head-xgboost.json"]

    @classmethod
    def load(cls, folder: Path, params: dict, classes: list[str]) -> "XGBoostHead":
        head = cls(**params)
        head.booster_ = xgb.Booster()
        head.booster_.load_model(folder / "head.ubj")
        head.best_iteration_ = json.loads((folder / "head-xgboost.json").read_text())["best_iteration"]
        head.classes_, head.n_features_in_ = np.array(classes, dtype=object), head.booster_.num_features()
        return head


class _Pages(xgb.DataIter):
    """Streamed rows for XGBoost's external memory: one block per call, with its labels and weights."""

    def __init__(self, x: StoreRows, codes: np.ndarray, weights: np.ndarray, cache: str):
        self.x, self.codes, self.weights = x, codes, weights
        self._blocks: Iterator[np.ndarray] | None = None
        self._done = 0
        super().__init__(cache_prefix=cache, release_data=True)

    def next(self, input_data: Callable) -> bool:
        if self._blocks is None:
            self._blocks = self.x.blocks()
        block = next(self._blocks, None)
        if block is None:
            return False
        rows = slice(self._done, self._done + len(block))
        input_data(data=block, label=self.codes[rows], weight=self.weights[rows])
        self._done += len(block)
        return True

    def reset(self) -> None:
        self._blocks, self._done = None, 0


class _Reporter(xgb.callback.TrainingCallback):
    """Every `every` boosting rounds, report minus the best validation loss so far (higher is better)."""

    def __init__(self, report: Report, every: int):
        super().__init__()
        self.report, self.every = report, every

    def after_iteration(self, model: xgb.Booster, epoch: int, evals_log: dict) -> bool:
        if epoch % self.every == 0:
            (losses,) = evals_log["val"].values()
            self.report(epoch // self.every, -float(min(losses)))  # the best so far, as early stopping keeps
        return False


# ----------------------------------------------------------------------------------------- knn

METRICS = ("cosine", "euclidean")
WEIGHTS = ("uniform", "distance")


def one_of(*values: str) -> Allowed:
    """One of a few names."""
    return Allowed(lambda value: isinstance(value, str) and value in values, " or ".join(values))


@register
class KnnHead(Head):
    """k nearest training rows on standardised embeddings (by the training rows' mean and standard
    deviation, as the linear head), by cosine (standardised, then L2-normalised) or euclidean distance.
    A row's class probabilities are the weighted shares of the classes among its neighbours, lightly
    smoothed. Classes are balanced as in the other heads: each neighbour's vote is weighted by its
    row's class weight ("balanced": the inverse frequency of its class in the training rows), times its
    sample weight and, with `weights="distance"`, by 1 / distance; so a rare class is not outvoted by
    the majority merely for being rare. Rows of weight zero are left out of the neighbours, as if
    dropped. `n_neighbors` larger than the training rows means all of them.

    `streams` is False: every training row is searched for every query, so they are held in memory in
    any case, and a streamed fit would only read the store into that same matrix. Predictions go block
    by block over the queries (`BLOCK_ELEMENTS`), so memory stays bounded for any number of queries.
    `random_state` is stored and unused (the neighbours are deterministic); every head takes it
    because the fit and the study pass the run's seed to each."""

    name = "knn"
    streams = False  # see the docstring: the training rows are the model, in memory whatever the input

    FITTED = ("train_", "codes_", "weight_", "mean_", "scale_")
    PARAMS = {
        "n_neighbors": integer(1),
        "metric": one_of(*METRICS),
        "weights": one_of(*WEIGHTS),
        "class_weight": CLASS_WEIGHT,
        "random_state": SEED,
    }

    BLOCK_ELEMENTS: ClassVar[int] = 2**22
    """Query rows x training rows per block of distances: 16 MB of float32 distances plus 32 MB of the
    indices that `argpartition` returns, whatever the number of queries."""
    SMOOTHING: ClassVar[float] = 1e-3
    """Added to every class's share (then renormalised); see `_proba` for why."""
    TINY: ClassVar[float] = 1e-12
    """The smallest distance a distance weight divides by: a query equal to a training row (distance 0)
    gets that row's vote ~1e12 times any other's, scikit-learn's rule for exact matches."""

    def __init__(
        self,
        *,
        n_neighbors: int = 15,
        metric: str = "cosine",
        weights: str = "uniform",
        class_weight: str | dict | None = "balanced",
        random_state: int = 0,
    ) -> None:
        self.n_neighbors = n_neighbors
        self.metric = metric
        self.weights = weights
        self.class_weight = class_weight
        self.random_state = random_state

    @classmethod
    def search_space(cls, trial: optuna.Trial) -> dict:
        # k up to 100 on any store: the search space cannot see the rows, and Optuna needs one range per
        # parameter across trials; fit uses min(k, training rows). Log-uniform: k=3 vs 6 differs as
        # much as 30 vs 60.
        return {
            "n_neighbors": trial.suggest_int("n_neighbors", 1, 100, log=True),
            "metric": trial.suggest_categorical("metric", list(METRICS)),
            "weights": trial.suggest_categorical("weights", list(WEIGHTS)),
        }

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        sample_weight: np.ndarray | None = None,
        report: Report | None = None,
    ) -> "KnnHead":
        """Keep the standardised training rows; `groups` (no inner validation to split) and `report` (no
        steps to report) are taken for the common interface and unused."""
        if isinstance(X, StoreRows):
            raise HeadError(f"{self.name} head: it holds every training row in memory; it cannot fit on streamed rows")
        X, codes, weights = self._prepare(X, y, groups, sample_weight)
        kept = weights > 0  # a zero-weight row would only take a neighbour's place without a vote
        if not np.any(kept):
            raise HeadError(f"{self.name} head: every row has weight zero (class_weight x sample_weight)")
        X = X[kept]
        self.mean_ = X.mean(axis=0)
        self.scale_ = X.std(axis=0)
        self.scale_[self.scale_ == 0] = 1.0
        self.train_ = self._standardised(X)
        self.codes_, self.weight_ = codes[kept], weights[kept]
        return self

    def _standardised(self, X: np.ndarray) -> np.ndarray:
        z = ((np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_).astype(np.float32)
        if self.metric == "cosine":  # unit rows: the dot product is the cosine
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            z /= np.where(norms > 0, norms, 1.0)
        return z

    def _proba(self, X: np.ndarray) -> np.ndarray:
        queries = self._standardised(X)
        train, n_classes = self.train_, len(self.classes_)
        k = min(self.n_neighbors, len(train))
        squares = np.einsum("ij,ij->i", train, train) if self.metric == "euclidean" else None
        block = max(1, self.BLOCK_ELEMENTS // len(train))
        proba = np.empty((len(queries), n_classes))
        for start in range(0, len(queries), block):
            q = queries[start : start + block]
            dot = q @ train.T
            if squares is None:
                distance = 1.0 - dot  # cosine distance
            else:
                distance = np.einsum("ij,ij->i", q, q)[:, None] - 2.0 * dot + squares[None, :]
            del dot
            nearest = np.argpartition(distance, k - 1, axis=1)[:, :k] if k < len(train) else None
            if nearest is None:
                nearest = np.broadcast_to(np.arange(len(train)), distance.shape)
            d = np.maximum(np.take_along_axis(distance, nearest, axis=1).astype(np.float64), 0.0)
            vote = self.weight_[nearest]
            if self.weights == "distance":
                vote = vote / np.maximum(d if squares is None else np.sqrt(d), self.TINY)
            cells = np.arange(len(q))[:, None] * n_classes + self.codes_[nearest]  # (query, class) cells
            votes = np.bincount(cells.ravel(), vote.ravel(), len(q) * n_classes).reshape(len(q), n_classes)
            share = votes / votes.sum(axis=1, keepdims=True)
            # A share is often exactly 0 (no neighbour of that class). Smoothing keeps every probability
            # above 0, so the logs that temperature calibration and the log loss take stay finite instead
            # of hinging on a clipping constant; it is monotone in the share, so the ranking the AUC and
            # the operating points read, and the argmax, are the shares' own.
            proba[start : start + len(q)] = (share + self.SMOOTHING) / (1.0 + n_classes * self.SMOOTHING)
        return proba

    def save(self, folder: Path) -> list[str]:
        np.savez(
            folder / "head.npz",
            mean=self.mean_,
            scale=self.scale_,
            train=self.train_,
            codes=self.codes_,
            weight=self.weight_,
        )
        return ["head.npz"]

    @classmethod
    def load(cls, folder: Path, params: dict, classes: list[str]) -> "KnnHead":
        head = cls(**params)
        with np.load(folder / "head.npz", allow_pickle=False) as z:
            head.mean_, head.scale_, head.train_ = z["mean"], z["scale"], z["train"]
            head.codes_, head.weight_ = z["codes"], z["weight"]
        head.classes_, head.n_features_in_ = np.array(classes, dtype=object), head.train_.shape[1]
        return head
