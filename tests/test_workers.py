"""One study, several worker processes, on a real PostgreSQL: trials add up, a worker killed with -9
mid-trial leaves no trial RUNNING, and the report is written once, by `fit --trials 0`.

Needs a PostgreSQL server: `.ci/run` starts one (`.ci/postgres.sh`) and exports its URL as
SKINLESION_TEST_POSTGRES; without it these tests are skipped with that message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter

import optuna
import pytest
from conftest import ROOT, synthetic_store

URL_VARIABLE = "SKINLESION_TEST_POSTGRES"


@pytest.fixture
def database() -> str:
    """A fresh database on the test server, dropped afterwards."""
    url = os.environ.get(URL_VARIABLE)
    if not url:
        pytest.skip(f"no PostgreSQL: run `source .ci/postgres.sh` (starts one on 127.0.0.1 and sets {URL_VARIABLE})")
    import psycopg

    name = f"skinlesion_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(url, autocommit=True)
    admin.execute(f"CREATE DATABASE {name}")
    yield url.rsplit("/", 1)[0] + "/" + name
    admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def _fit(store, out, url, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--features",
        str(store),
        "--head",
        "mlp",
        "--out",
        str(out),
        "--storage",
        url,
        "--study",
        "shared",
        "--folds",
        "3",
        "--heartbeat",
        "1",
        *map(str, extra),
    ]


def test_four_workers_one_killed_mid_trial(tmp_path, database):
    store = synthetic_store(tmp_path / "syn.h5", n=400, dim=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            _fit(store, tmp_path / f"w{k}", database, "--trials", 3, "--no-report"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    victim = workers[0]
    storage = optuna.storages.RDBStorage(database)
    deadline = time.monotonic() + 240
    killed_trial = None
    while killed_trial is None and time.monotonic() < deadline and victim.poll() is None:
        try:
            study = optuna.load_study(study_name="shared", storage=storage)
        except KeyError:  # not created yet
            time.sleep(0.1)
            continue
        mine = [
            t
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
        ]
        if mine:
            os.kill(victim.pid, signal.SIGKILL)
            killed_trial, killed_at = mine[0].number, time.monotonic()
        time.sleep(0.05)
    assert killed_trial is not None, "the first worker never ran a trial"
    victim.wait()
    for w in workers[1:]:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    time.sleep(max(0.0, killed_at + 2.5 - time.monotonic()))  # its heartbeat is stale after 2 x 1 s
    final = subprocess.run(
        _fit(store, tmp_path / "final", database, "--trials", 0), capture_output=True, text=True, env=env
    )
    assert final.returncode == 0, final.stderr
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert trials[killed_trial].state == optuna.trial.TrialState.FAIL
    by_worker = Counter(t.user_attrs.get("worker", "").split(":")[-1] for t in trials if t.state.is_finished())
    for w in workers[1:]:  # every trial the survivors ran is in the study
        assert by_worker[str(w.pid)] == 3
    assert (tmp_path / "final" / "report.md").is_file()
    assert not any((tmp_path / f"w{k}" / "report.md").exists() for k in range(4))
