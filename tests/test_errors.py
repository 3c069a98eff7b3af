"""Correct or loud: a user's mistake or a fault of the machine is one line with a documented exit status
(0 done, 1 the machine or unusable images, 2 bad input or options, 130 interrupted), never a traceback,
and nothing already computed is lost."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import ROOT, synthetic_store

import cli as entry
from classify.runs import CARD

FAST = ("--folds", "3", "--trials", "2")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def store(tmp_path) -> Path:
    return synthetic_store(tmp_path / "syn.h5", n=240)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` on a read-only medium: a read-only bind mount for root (whom permissions do not stop),
    read-only permissions for anyone else."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield folder
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A file system of `size` at `folder` (tmpfs), to fill up."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# ----------------------------------------------------------------------------------------- options


FIT = ("fit", "--features", "x.h5", "--head", "linear", "--out", "r")


@pytest.mark.parametrize(
    "argv, option",
    [
        ((*FIT, "--folds", "0"), "--folds"),
        ((*FIT, "--folds", "1"), "--folds"),
        ((*FIT, "--test-fraction", "1.5"), "--test-fraction"),
        ((*FIT, "--test-fraction", "0"), "--test-fraction"),
        ((*FIT, "--test-fraction", "1"), "--test-fraction"),
        ((*FIT, "--memory-budget", "abc"), "--memory-budget"),
        ((*FIT, "--n-jobs", "0"), "--n-jobs"),
        ((*FIT, "--trials", "-1"), "--trials"),
        ((*FIT, "--timeout", "0"), "--timeout"),
        (("extract", "--data", "d", "--backbone", "b", "--batch-size", "0"), "--batch-size"),
        (("extract", "--data", "d", "--backbone", "b", "--workers", "-2"), "--workers"),
        (("extract", "--data", "d", "--backbone", "b", "--max-failed", "1.5"), "--max-failed"),
        (("extract", "--data", "d", "--backbone", "b", "--flush-rows", "0"), "--flush-rows"),
        (("evaluate", "--run", "r", "--memory-budget", "10XB"), "--memory-budget"),
        (("predict", "--run", "r", "--images", "x.jpg", "--batch-size", "-1"), "--batch-size"),
        (("finetune", "--data", "d", "--backbone", "b", "--out", "o", "--epochs", "0"), "--epochs"),
        (("finetune", "--data", "d", "--backbone", "b", "--out", "o", "--unfreeze", "0"), "--unfreeze"),
        (("finetune", "--data", "d", "--backbone", "b", "--out", "o", "--ema", "1"), "--ema"),
    ],
)
def test_an_option_out_of_range_is_one_line_and_status_2_before_any_work(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        entry.main(list(argv))
    assert info.value.code == 2
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and option in lines[0] and "Traceback" not in lines[0], lines


def test_the_same_from_a_real_process(tmp_path):
    done = _run(*FIT, "--folds", "0")
    assert done.returncode == 2 and len(_lines(done.stderr)) == 1 and "--folds" in done.stderr
    done = _run(*FIT, "--memory-budget", "abc")
    assert done.returncode == 2 and len(_lines(done.stderr)) == 1 and "1GB, 800MB" in done.stderr


@pytest.mark.parametrize("command", list(entry.COMMANDS))
def test_help_shows_each_default_once_has_help_for_every_option_and_ends_with_an_example(command, capsys):
    parser = entry.build_parser(command)
    with pytest.raises(SystemExit) as info:
        parser.parse_args([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("(default: True)", "(default: False)", "(default: None)"):
        assert flag not in text
    lines = _lines(text)
    assert lines[-2].strip() == "example:" and lines[-1].strip().startswith(f"python cli.py {command}")
    sub = parser._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help"
            shown = sub.formatter_class(prog="cli.py")._get_help_string(action)
            has_default = action.default not in (None, "") and not isinstance(action.default, bool)
            assert "default" in shown or not has_default, shown  # a 0 or "auto" default is shown too
    for option in re.split(r"\n  -", text):  # one option's help
        assert option.count("default") <= 1, option


# ----------------------------------------------------------------------------------------- run folders


def test_a_damaged_or_edited_run_card_is_one_line_and_status_2(tmp_path, store, cli):
    run = tmp_path / "run"
    assert cli("fit", "--features", store, "--head", "linear", "--out", run, *FAST)[0] == 0
    card = json.loads((run / CARD).read_text())
    edits = {
        "truncated": (run / CARD).read_text()[:100],
        "no classes": json.dumps({k: v for k, v in card.items() if k != "classes"}),
        "a file outside head/": json.dumps({**card, "files": {"../config.json": "0" * 64}}),
        "a list": "[1, 2]",
    }
    for what, text in edits.items():
        (run / CARD).write_text(text)
        code, _, err = cli("evaluate", "--run", run)
        assert code == 2 and len(_lines(err)) == 1 and str(run / CARD) in err, (what, err)


class _Payload:
    """A pickle that runs code when loaded: it would create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_head_file_holding_code_is_refused_without_running_it(tmp_path, store, cli):
    import hashlib

    run = tmp_path / "mlp"
    code, _, err = cli("fit", "--features", store, "--head", "mlp", "--out", run, "--folds", "2", "--trials", "1")
    assert code == 0, err
    marker = tmp_path / "pwned"
    head = run / "head" / "head.pt"
    head.write_bytes(pickle.dumps({"model.0.weight": _Payload(marker)}))
    card = json.loads((run / CARD).read_text())
    card["files"]["head.pt"] = hashlib.sha256(head.read_bytes()).hexdigest()  # the card edited to match
    (run / CARD).write_text(json.dumps(card))
    code, _, err = cli("evaluate", "--run", run)
    assert code == 2 and len(_lines(err)) == 1 and "cannot be read as data" in err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- the machine


def test_fit_on_a_read_only_store_writes_nothing_into_it(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    store = synthetic_store(data / "syn.h5", n=240)
    before = store.read_bytes()
    with read_only(data):
        runs = [tmp_path / f"run-{head}" for head in ("linear", "xgboost")]
        for run, head in zip(runs, ("linear", "xgboost")):
            done = _run("fit", "--features", store, "--head", head, "--out", run, *FAST)
            assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in data.iterdir()) == ["syn.h5"]
    assert store.read_bytes() == before
    tests = [sorted(r["image"] for r in _csv(run / "test_predictions.csv")) for run in runs]
    assert tests[0] == tests[1]  # every head fitted on the same store and recipe: the same test rows


def _csv(path: Path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(path)))


def test_a_read_only_output_folder_is_one_line_and_status_1(tmp_path, store):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        done = _run("fit", "--features", store, "--head", "linear", "--out", out / "run", *FAST)
    assert done.returncode == 1
    last = _lines(done.stderr)[-1]
    assert last.startswith("error: ") and str(out / "run") in last and "Traceback" not in done.stderr
    assert list(out.iterdir()) == []


def test_a_full_disk_is_one_line_keeps_finished_work_and_leaves_no_temporary_file(tmp_path):
    from imagefiles import lesion, save
    from conftest import TINY

    images = tmp_path / "images"
    for k in range(24):
        save(images / ("mel" if k % 2 else "nv") / f"i{k:02d}.png", lesion(k, (48, 36)))
    with small_disk(tmp_path / "disk", "96k") as disk:
        command = (
            "extract",
            "--data",
            images,
            "--backbone",
            TINY,
            "--weights",
            "none",
            "--out",
            disk / "f.h5",
            "--precision",
            "fp32",
            "--workers",
            "0",
            "--runtime",
            "torch",
            "--flush-rows",
            "4",
        )
        done = _run(*command)
        assert done.returncode == 1, done.stderr
        last = _lines(done.stderr)[-1]
        assert last.startswith("error: ") and "disk is full" in last and "Traceback" not in done.stderr
        left = [p.name for p in disk.rglob("*")]
        assert not [n for n in left if n.endswith(".tmp")], left
        assert not (disk / "f.h5").exists()
        journalled = len(list((disk / "f.h5.partial").glob("chunk-*.npz")))
    assert journalled >= 1  # the chunks that fitted are kept for the rerun


# ----------------------------------------------------------------------------------------- interruptions


def test_sigint_during_fit_is_one_line_and_the_rerun_finishes_the_study(tmp_path, store):
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
        "--study",
        "s",
    ]
    # more trials than could ever finish before the signal, however slowly this test reads the pipe; and
    # Ctrl-C's default restored in the child: a shell's background job (`.ci/run &`) starts with SIGINT
    # ignored, which Python then keeps, and the signal would never arrive
    proc = subprocess.Popen(
        [*command, "--trials", "100000"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.match(r"trial 1 \w+", line):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    tail = _lines(rest)
    assert tail[-1].startswith("interrupted: after ") and "Rerun the same command" in tail[-1]
    assert "Traceback" not in rest and not [line for line in tail if not line.startswith(("trial ", "interrupted"))]
    done = subprocess.run([*command, "--trials", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="s", storage=_journal(run))
    states = {t.state for t in study.trials}
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.COMPLETE in states


def _journal(run: Path):
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(run / "study.journal")))


def test_a_trial_of_a_killed_worker_is_marked_failed_on_the_next_start(tmp_path, store):
    run = tmp_path / "run"
    run.mkdir()
    # a worker that dies (as kill -9 would leave it) in the middle of its trial, in the run's journal
    script = (
        "import os, socket, optuna; from optuna.storages.journal import JournalFileBackend\n"
        f"s = optuna.storages.JournalStorage(JournalFileBackend({str(run / 'study.journal')!r}))\n"
        "study = optuna.create_study(study_name='s', storage=s, direction='maximize')\n"
        "t = study.ask(); t.suggest_float('C', 1e-3, 1.0, log=True)\n"
        "t.set_user_attr('worker', f'{socket.gethostname()}:{os.getpid()}')\n"
        "os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    dead = optuna.load_study(study_name="s", storage=_journal(run)).trials
    assert [t.state for t in dead] == [optuna.trial.TrialState.RUNNING]
    done = _run("fit", "--features", store, "--head", "linear", "--out", run, "--study", "s", *FAST)
    assert done.returncode == 0, done.stderr
    assert "trial 0 was left running by process" in done.stderr
    trials = optuna.load_study(study_name="s", storage=_journal(run)).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert [t.state for t in trials[1:]] == [optuna.trial.TrialState.COMPLETE] * 2
    summary = json.loads((run / "study.json").read_text())
    assert summary["best"]["number"] != 0


def test_fit_with_no_trials_on_a_fresh_folder_leaves_nothing_behind(tmp_path, store, cli):
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", tmp_path / "fresh", "--trials", "0")
    assert code == 2 and "--trials 0" in err and len(_lines(err)) == 1
    assert not (tmp_path / "fresh").exists()


def test_a_test_part_too_small_is_refused_or_marked_everywhere(tmp_path, cli):
    small = synthetic_store(tmp_path / "small.h5", n=120)  # 60 lesions: 6 of each class in the test part
    code, _, err = cli("fit", "--features", small, "--head", "linear", "--out", tmp_path / "r", *FAST)
    assert code == 2 and "--allow-small-test" in err and "6 of 'mel'" in err and len(_lines(err)) == 1
    assert not (tmp_path / "r").exists()
    code, out, err = cli(
        "fit", "--features", small, "--head", "linear", "--out", tmp_path / "r", *FAST, "--allow-small-test"
    )
    assert code == 0, err
    assert _lines(out)[0].startswith("WARNING: the test part holds only 6 of 'mel', 6 of 'nv' lesions")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "fewer than 10" in metrics["warning"] and metrics["test"]["warning"] == metrics["warning"]
    assert "**Warning: the test part holds only" in (tmp_path / "r" / "report.md").read_text()


def test_splits_are_made_over_usable_rows_only(tmp_path, cli):
    """Rows whose image failed are in no fold and not in the test part; the report says so."""
    from features.store import FeatureStore, write_arrays

    source = FeatureStore(synthetic_store(tmp_path / "syn.h5", n=240))
    samples = source.samples()
    x = source.embeddings("fake")
    failed = {samples.image_id[i] for i in range(0, 240, 8)}  # 30 images that "could not be read"
    keep = [i for i in range(240) if samples.image_id[i] not in failed]
    partial = tmp_path / "partial.h5"
    write_arrays(partial, samples, {"fake": (x, source.backbone_attrs("fake"))})
    import h5py

    with h5py.File(partial, "r+") as f:  # as an extraction leaves them: not done, listed under /failed
        done = np.zeros(240, dtype=bool)
        done[keep] = True
        f["embeddings/fake/done"][...] = done
        del f["failed"]
        f.create_dataset("failed/image_id", data=np.array(sorted(failed), dtype=object), dtype=h5py.string_dtype())
        f.create_dataset(
            "failed/reason", data=np.array(["missing file"] * len(failed), dtype=object), dtype=h5py.string_dtype()
        )
    run = tmp_path / "run"
    code, _, err = cli("fit", "--features", partial, "--head", "linear", "--out", run, *FAST)
    assert code == 0, err
    from classify.runs import read_run_split

    split = read_run_split(run)
    assert not set(split.image_id) & failed and len(split.image_id) == 210
    labels = dict(zip(samples.image_id, samples.label))
    for k in range(3):  # every class in every fold of the rows fitted
        assert {labels[i] for i in split.image_id[split.fold == k]} == {"mel", "nv"}
    from features.splits import TEST, UNUSED, SplitSpec, split_for

    made = split_for(FeatureStore(partial), SplitSpec(folds=3))
    rows_failed = np.isin(samples.image_id, list(failed))
    assert np.all(made[rows_failed] == UNUSED)
    groups = np.array(samples.group, dtype=object)
    for c in ("mel", "nv"):  # the test share is of the usable lesions
        usable = {g for g, lab, bad in zip(groups, samples.label, rows_failed) if lab == c and not bad}
        assert len(set(groups[(made == TEST) & (np.array(samples.label) == c)])) == round(0.2 * len(usable))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["left_out"] == {"image could not be read": 30}
    assert "Labelled rows left out of the split: 30 (30 image could not be read)" in (run / "report.md").read_text()


def test_a_mostly_failed_extraction_says_so_last_and_is_status_1(tmp_path):
    """A manifest pointed at a folder holding few of its images (as HAM10000_metadata.csv at a folder of
    150 of its 10,015): a loud last line, exit status 1 (--max-failed 0.5), and usable rows counted."""
    from imagefiles import lesion, save
    from conftest import TINY

    for k in range(3):
        save(tmp_path / "images" / f"ISIC_{k}.png", lesion(k, (48, 36)))
    rows = "".join(f"ISIC_{k},{('mel', 'nv')[k % 2]}\n" for k in range(10))  # 5 mel, 5 nv
    (tmp_path / "meta.csv").write_text("image_id,dx\n" + rows)
    command = (
        "extract",
        "--data",
        tmp_path / "meta.csv",
        "--images",
        tmp_path / "images",
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--runtime",
        "torch",
    )
    done = _run(*command, "--out", tmp_path / "a.h5")
    assert done.returncode == 1, done.stderr
    out = _lines(done.stdout)
    assert out[-1].startswith("WARNING: 70.0% of the images could not be used (7 of 10; most often: missing file)")
    assert "10 rows, 3 labelled and usable (mel 2, nv 1)" in out[0]  # ISIC_0, ISIC_2: mel; ISIC_1: nv
    done = _run(*command, "--out", tmp_path / "b.h5", "--max-failed", "0.8")
    assert done.returncode == 0 and _lines(done.stdout)[-1].startswith("WARNING: 70.0%")
