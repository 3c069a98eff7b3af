"""classify/study.py: the objective's pruning under the cv and holdout protocols, with the real median
pruner of `open_study`, the real `Objective` and a real head on a small synthetic matrix."""

from __future__ import annotations

from typing import Callable

import numpy as np
import optuna
import pytest

from classify.heads import LinearHead
from classify.study import STEPS_PER_FOLD, Objective, StudyError, history, open_study, pruned_at

optuna.logging.set_verbosity(optuna.logging.WARNING)

FOLDS = 4
GOOD = [{"C": c} for c in (10.0, 8.0, 5.0, 3.0, 2.0)]
"""Weak regularisation: the linear head finds the difference of the two columns, which is the class."""
BAD = [{"C": c} for c in (1e-4, 3e-4, 1e-3)]
"""Strong regularisation: the head's weights follow the class means, which the shared noise hides."""
FOLD_END = STEPS_PER_FOLD - 1


def masked_signal(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose class is column 0 minus column 1 (both carry the same loud noise) and lesion groups of
    two rows dealt to FOLDS folds. A weakly regularised linear head separates the classes; a strongly
    regularised one is near chance, so it is far below the median of the good trials after any fold."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) // 2
    folds = groups % FOLDS
    y = np.array(["mel", "nv"], dtype=object)[(groups // FOLDS) % 2]  # both classes in every fold
    signal = np.where(y == "mel", 1.0, -1.0) + rng.normal(0, 0.2, n)
    noise = rng.normal(0, 10, n)
    x = np.column_stack([signal + noise, noise, rng.normal(size=(n, 2))]).astype(np.float32)
    return x, y, groups, folds


def run_study(protocol: str, head: type = LinearHead) -> optuna.Study:
    """The good trials first (the pruner waits for five complete ones), then the bad ones."""
    study = open_study(f"pruning-{protocol}", optuna.storages.InMemoryStorage(), seed=0)
    for params in GOOD + BAD:
        study.enqueue_trial(params)
    x, y, groups, folds = masked_signal()
    objective = Objective(head, x, y, groups, folds, seed=0, protocol=protocol)
    study.optimize(objective, n_trials=len(GOOD) + len(BAD))
    return study


def test_cv_prunes_trials_far_below_the_median_after_the_second_fold() -> None:
    study = run_study("cv")
    good, bad = study.trials[: len(GOOD)], study.trials[len(GOOD) :]
    assert [t.state for t in good] == [optuna.trial.TrialState.COMPLETE] * len(GOOD)
    assert min(t.value for t in good) > 0.9  # the problem is solvable: the median is high
    assert [t.state for t in bad] == [optuna.trial.TrialState.PRUNED] * len(BAD)
    for trial in bad:
        # fold 0 always ends (n_warmup_steps): the first judgement is the running mean after fold 1
        assert sorted(trial.intermediate_values) == [FOLD_END, STEPS_PER_FOLD + FOLD_END]
        assert trial.intermediate_values[FOLD_END] < 0.7
        assert "fold_balanced_accuracy" not in trial.user_attrs  # stopped before the last fold
    for trial in good:
        assert sorted(trial.intermediate_values) == [k * STEPS_PER_FOLD + FOLD_END for k in range(FOLDS)]
        assert trial.intermediate_values[(FOLDS - 1) * STEPS_PER_FOLD + FOLD_END] == pytest.approx(trial.value)


class Reporting(LinearHead):
    """The linear head, recording the `report` callback each fit is given."""

    given: list[Callable[[int, float], None] | None] = []

    def fit(
        self, X: np.ndarray, y: np.ndarray, *, report: Callable[[int, float], None] | None = None, **kwargs: object
    ) -> "Reporting":
        Reporting.given.append(report)
        return super().fit(X, y, **kwargs)


def test_holdout_reports_nothing_and_prunes_nothing() -> None:
    Reporting.given = []
    study = run_study("holdout", head=Reporting)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * (len(GOOD) + len(BAD))
    assert all(t.intermediate_values == {} for t in study.trials)
    assert Reporting.given == [None] * len(study.trials)  # one fit per trial, with no in-fit reports
    values = [t.value for t in study.trials]
    assert max(values[len(GOOD) :]) < 0.7 < 0.9 < min(values[: len(GOOD)])  # as bad as under cv: kept anyway
    assert all(len(t.user_attrs["fold_balanced_accuracy"]) == 1 for t in study.trials)


def test_cv_passes_the_in_fit_reports_on_at_the_folds_steps() -> None:
    Reporting.given = []
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"C": 5.0})
    x, y, groups, folds = masked_signal(n=80)
    Objective(Reporting, x, y, groups, folds, seed=0)(study.ask())
    assert len(Reporting.given) == FOLDS and all(callable(r) for r in Reporting.given)
    Reporting.given[2](7, 0.25)  # fold 2, round 7
    Reporting.given[1](10**6, 0.5)  # a round past the fold's steps stays inside the fold, before its end
    values = study.trials[0].intermediate_values
    assert values[2 * STEPS_PER_FOLD + 7] == 0.25 and values[STEPS_PER_FOLD + FOLD_END - 1] == 0.5


def test_an_unknown_protocol_is_refused() -> None:
    x, y, groups, folds = masked_signal(n=40)
    with pytest.raises(StudyError, match="protocol 'bootstrap': choose cv, holdout"):
        Objective(LinearHead, x, y, groups, folds, seed=0, protocol="bootstrap")


def test_objective_options_are_keyword_only() -> None:
    x, y, groups, folds = masked_signal(n=40)
    with pytest.raises(TypeError):
        Objective(LinearHead, x, y, groups, folds, 0)


def test_a_pruned_trial_is_placed_at_its_last_fold_score_not_at_a_heads_own_scale():
    """The history plot marks a pruned trial where it stopped: the mean score of the folds it finished
    (the fold-end reports), never a within-fold report such as XGBoost's negative loss."""
    study = optuna.create_study(direction="maximize")

    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            return 0.8
        trial.report(-0.4, 3)  # within fold 0: a head's own scale
        if trial.number == 2:
            trial.report(0.7, STEPS_PER_FOLD - 1)  # fold 0 finished: its score
            trial.report(-0.3, STEPS_PER_FOLD + 5)
        raise optuna.TrialPruned()

    study.optimize(objective, n_trials=3)
    assert [pruned_at(t) for t in study.trials] == [None, None, 0.7]
    assert [(t["state"], t["pruned_at"]) for t in history(study)] == [
        ("COMPLETE", None),
        ("PRUNED", None),
        ("PRUNED", 0.7),
    ]
