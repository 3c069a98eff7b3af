"""Optuna studies: one per store x backbone(s) x head, scored by lesion-grouped K-fold CV on the
study rows (never the test rows), with intermediate values that let a pruner stop bad trials.

The objective is a callable object that holds the data, loaded once (as in Optuna's examples). Step
numbers are laid out per fold: fold k's per-epoch / per-round values (from the head's `report`) go to
steps k*STEPS_PER_FOLD + round, and the running mean balanced accuracy after fold k to step
k*STEPS_PER_FOLD + STEPS_PER_FOLD - 1, so that the values other trials have at a step are of the same
fold and round. (Optuna's median pruner sets against their median the trial's best value at any step so
far; docs/evaluation.md says what that means for XGBoost's in-fit values.)

Only cross-validated trials are pruned, and never in fold 0 (see `Objective` for why holdout trials
are not).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from sklearn.metrics import balanced_accuracy_score

from classify.heads import Head
from classify.inputs import fit_views, proba_views
from classify.metrics import macro_auc

if TYPE_CHECKING:
    from features.rows import StoreRows

__all__ = [
    "JOURNAL",
    "KEPT",
    "MAX_RETRY",
    "PROTOCOLS",
    "STEPS_PER_FOLD",
    "WORKER",
    "Objective",
    "StudyError",
    "fail_dead_local",
    "fail_interrupted",
    "fail_stale",
    "history",
    "pruned_at",
    "kept_trial",
    "open_study",
    "progress",
    "storage_for",
]

log = logging.getLogger("classify")

STEPS_PER_FOLD = 1000
KEPT = "fold0.npz"
JOURNAL = "study.journal"
"""Default storage: an Optuna journal file in the run folder (file-locked: several local processes)."""


WORKER = f"{socket.gethostname()}:{os.getpid()}"
"""Recorded on every trial: which machine and process ran it (shared studies)."""
MAX_RETRY = 2
"""A trial whose worker died is run again (same parameters) up to this many times."""
SCHEMA_ATTEMPTS = 5
PROTOCOLS = ("cv", "holdout")
"""How a trial is scored: every fold of the study rows in turn (cv), or fold 0 alone (holdout)."""


class StudyError(ValueError):
    """A study option that cannot work (e.g. a --storage that is not a database URL)."""


def storage_for(url: str | None, run: Path, heartbeat: int = 60) -> optuna.storages.BaseStorage:
    """`--storage URL` (sqlite:///..., postgresql://...) or the run folder's journal file.

    Database storages get Optuna's heartbeat: a worker killed mid-trial stops beating, and after
    2 x `heartbeat` seconds the next worker to start a trial (or the final `fit --trials 0`) marks that
    trial FAIL and queues it again (`RetryHeartbeatStaleTrialCallback`), so no trial stays RUNNING."""
    if url:
        if "://" not in url:
            raise StudyError(f"--storage {url!r}: a database URL (sqlite:///FILE, postgresql://USER@HOST/DB)")
        for attempt in range(SCHEMA_ATTEMPTS):
            try:
                return _rdb_storage(url, heartbeat)
            except sqlalchemy.exc.SQLAlchemyError:
                # workers started together on a fresh database race to create Optuna's tables: the
                # losers fail on a duplicate key, and find the tables made when they try again
                if attempt == SCHEMA_ATTEMPTS - 1:
                    raise
                time.sleep(0.5 + random.random())
    run.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(run / JOURNAL)))


def _rdb_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
        )


def fail_stale(study: optuna.Study) -> None:
    """Mark the trials of dead workers FAIL now (database storages; the journal has no heartbeat)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def fail_dead_local(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials of processes of this machine that no longer exist (a worker killed
    with kill -9 in a journal-file study, which has no heartbeat): otherwise they stay RUNNING forever.
    Trials of live processes and of other machines are left alone. Returns the trials marked."""
    host = socket.gethostname()
    marked = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        marked.append(trial.number)
        log.warning("trial %d was left running by process %s, which no longer exists: marked failed", trial.number, pid)
    return marked


def fail_interrupted(study: optuna.Study, first: int) -> list[int]:
    """After Ctrl-C: mark FAIL the trials this process left RUNNING (numbered `first` or later, recorded
    as this process's, or not yet recorded at all: the interrupt can land between Optuna creating a trial
    and the objective naming its worker)."""
    marked = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.number >= first and trial.user_attrs.get("worker", WORKER) == WORKER:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            marked.append(trial.number)
    return marked


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def open_study(name: str, storage: optuna.storages.BaseStorage | str, seed: int) -> optuna.Study:
    """Create or resume the study `name`; seeded TPE (offset by the trials already there, so that a
    resumed or second worker does not repeat the first one's suggestions) and a median pruner."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=STEPS_PER_FOLD),
    )
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=8)
    return study


class Objective:
    """Mean balanced accuracy over the grouped folds of the study rows for one trial's parameters
    (`protocol="holdout"`: fold 0's alone).

    Pruning: under cv, the median pruner of `open_study` sees each fold's in-fit values (the head's
    `report`) and the running mean after each fold; it waits for fold 0 to end (`n_warmup_steps`), so a
    trial is judged once it has one complete, held-out score. Under holdout nothing is reported and no
    trial is pruned: fold 0 is the only fold, and before its score exists there are only in-fit values,
    which rank trials by how fast they learn, not by how well they end (a low learning rate or strong
    regularisation trails early and may finish best). Holdout is chosen for stores too large to hold
    in memory, where a study has few trials and the pruner acts only after five complete ones; not
    reporting also spares a storage write and a pruner query per epoch or boosting round."""

    def __init__(
        self,
        head: type[Head],
        x: np.ndarray | StoreRows,
        y: np.ndarray,
        groups: np.ndarray,
        folds: np.ndarray,
        *,
        seed: int,
        fixed: dict | None = None,
        protocol: str = "cv",
        keep: Path | None = None,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise StudyError(f"protocol {protocol!r}: choose {', '.join(PROTOCOLS)}")
        self.head, self.x, self.y, self.groups, self.folds = head, x, y, groups, folds
        self.seed, self.fixed = seed, fixed or {}
        self.keep = keep if protocol == "holdout" else None
        """Holdout: each trial's model and fold-0 predictions are kept here (`kept_trial`), since the
        final fit of the best parameters would train exactly that model again."""
        self.scored = [0] if protocol == "holdout" else list(range(int(folds.max()) + 1))
        """Folds scored per trial: every one (cv), or fold 0 (holdout)."""
        self.prunes = protocol == "cv"
        """Whether intermediate values are reported, so that the pruner can stop the trial (cv only)."""

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)
        params = {**self.head.search_space(trial), **self.fixed}
        scores, aucs = [], []
        for k in self.scored:
            train, val = self.folds != k, self.folds == k
            head = self.head(**params, random_state=self.seed)
            report = _reporter(trial, k) if self.prunes else None
            fit_views(head, self.x[train], self.y[train], self.groups[train], report=report)
            proba = proba_views(head, self.x[val])
            predicted = head.classes_[proba.argmax(axis=1)]
            scores.append(float(balanced_accuracy_score(self.y[val], predicted)))
            aucs.append(macro_auc(self.y[val], proba, list(head.classes_)))
            if self.keep is not None:
                folder = self.keep / f"trial-{trial.number}"
                folder.mkdir(parents=True, exist_ok=True)
                head.save(folder)
                np.savez(folder / KEPT, proba=proba, classes=np.asarray(head.classes_, dtype=str))
                trial.set_user_attr("kept", str(folder.resolve()))
            if self.prunes:
                _report(trial, float(np.mean(scores)), k * STEPS_PER_FOLD + STEPS_PER_FOLD - 1)
        trial.set_user_attr("fold_balanced_accuracy", scores)
        trial.set_user_attr("cv_auc", float(np.nanmean(aucs)))
        return float(np.mean(scores))


def kept_trial(
    trial: optuna.trial.FrozenTrial, head: type[Head], params: dict, seed: int
) -> tuple[Head, np.ndarray] | None:
    """The holdout trial's own model and its fold-0 probabilities (columns in its classes' order), or
    None where they are not on this machine (a worker elsewhere ran it: then the caller refits)."""
    folder = Path(trial.user_attrs.get("kept") or "/nonexistent")
    if not (folder / KEPT).is_file():
        return None
    with np.load(folder / KEPT, allow_pickle=False) as z:
        proba, classes = z["proba"], [str(c) for c in z["classes"]]
    return head.load(folder, {**params, "random_state": seed}, classes), proba


def _report(trial: optuna.Trial, value: float, step: int) -> None:
    trial.report(value, step)
    if trial.should_prune():
        raise optuna.TrialPruned()


def _reporter(trial: optuna.Trial, fold: int) -> Callable[[int, float], None]:
    def report(step: int, value: float) -> None:
        _report(trial, value, fold * STEPS_PER_FOLD + min(step, STEPS_PER_FOLD - 2))

    return report


def progress() -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """A callback printing one line per finished trial."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        done = len([t for t in study.trials if t.state.is_finished()])
        if trial.state == optuna.trial.TrialState.PRUNED:
            state, value = f"pruned in fold {(trial.last_step or 0) // STEPS_PER_FOLD}", "-"
        else:
            state = trial.state.name.lower()
            value = f"{trial.value:.4f}" if trial.value is not None else "-"
        try:
            best = f"{study.best_value:.4f}"
        except ValueError:
            best = "-"
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        log.info(
            "trial %d %s: cv balanced accuracy %s (best %s) [%s] (%d finished in the study)",
            trial.number,
            state,
            value,
            best,
            params,
            done,
        )

    return callback


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def pruned_at(trial: optuna.trial.FrozenTrial) -> float | None:
    """A pruned trial's mean cross-validation score over the folds it finished (the last fold-end report;
    the reports within a fold are a head's own scale, such as XGBoost's loss); None when it was stopped
    inside its first fold, or was not pruned."""
    if trial.state != optuna.trial.TrialState.PRUNED:
        return None
    ends = [step for step in trial.intermediate_values if (step + 1) % STEPS_PER_FOLD == 0]
    return trial.intermediate_values[max(ends)] if ends else None


def history(study: optuna.Study) -> list[dict]:
    """Every trial of the study, JSON-ready."""
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "cv_auc": t.user_attrs.get("cv_auc"),
            "seconds": t.duration.total_seconds() if t.duration else None,
            "pruned_at": pruned_at(t),
        }
        for t in study.trials
    ]
