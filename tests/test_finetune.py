"""The fine-tuning stage: what trains and what stays frozen, outputs that predict/extract reuse,
kill -9 and --resume, and its faults."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from imagefiles import lesion_set

from classify.finetune import FinetuneConfig, FinetuneError, finetune, model, stages
from classify.finetune.checkpoint import Checkpoint
from classify.finetune.config import BACKBONE_FILE, BEST, CHECKPOINT, REFIT_CHECKPOINT
from classify.runs import load_run, read_run_split
from extract.backbones import get_family, load_backbone
from features.splits import TEST
from features.store import FeatureStore

FAST = ("--epochs", "2", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--allow-small-test")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> dict:
    """A store of random-init TINY embeddings and a linear `fit` run on it (fp32 throughout)."""
    import cli as entry

    root = tmp_path_factory.mktemp("frozen")
    manifest = lesion_set(root / "data")
    store = root / "frozen.h5"
    assert (
        entry.main(
            [
                "extract",
                "--data",
                str(manifest),
                "--backbone",
                TINY,
                "--weights",
                "none",
                "--out",
                str(store),
                "--precision",
                "fp32",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    run = root / "linear"
    assert (
        entry.main(
            [
                "fit",
                "--features",
                str(store),
                "--head",
                "linear",
                "--out",
                str(run),
                "--folds",
                "2",
                "--trials",
                "2",
                "--test-fraction",
                "0.34",
                "--allow-small-test",
            ]
        )
        == 0
    )
    return {"manifest": manifest, "store": store, "run": run, "root": root}


def _finetune(cli, frozen, out, *extra):
    return cli(
        "finetune",
        "--data",
        frozen["manifest"],
        "--backbone",
        TINY,
        "--init",
        frozen["run"],
        "--out",
        out,
        *FAST,
        *extra,
    )


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_only_the_unfrozen_blocks_change(tmp_path, cli, frozen, bn):
    out = tmp_path / "ft"
    code, _, err = _finetune(cli, frozen, out, "--unfreeze", "1", "--lr", "1e-2", "--backbone-lr", "1e-2", "--bn", bn)
    assert code == 0, err
    before = load_backbone(TINY, "none").module
    state = torch.load(out / CHECKPOINT, weights_only=True)["model"]  # the first stage's last epoch
    _same_blocks_but_the_last(
        before, {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}, bn
    )
    if (out / REFIT_CHECKPOINT).exists():  # and the refit's, if validation chose an epoch after 0
        state = torch.load(out / REFIT_CHECKPOINT, weights_only=True)["model"]
        _same_blocks_but_the_last(
            before, {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}, bn
        )


def _same_blocks_but_the_last(before, state: dict, bn: str) -> None:
    after = load_backbone(TINY, "none").module
    after.load_state_dict(state)
    blocks_before, blocks_after = get_family(TINY).blocks(before), get_family(TINY).blocks(after)
    last = len(blocks_before) - 1
    for k, (b, a) in enumerate(zip(blocks_before, blocks_after)):
        params = [(x, y) for mb, ma in zip(b, a) for x, y in zip(mb.parameters(), ma.parameters())]
        stats = [
            (x, y)
            for mb, ma in zip(b, a)
            for (name, x), (_, y) in zip(mb.state_dict().items(), ma.state_dict().items())
            if "running" in name
        ]
        assert all(torch.equal(x, y) for x, y in params) == (k < last), f"weights of block {k}"
        if stats:  # batch-norm statistics: frozen blocks keep them; the trained block per --bn
            assert all(torch.equal(x, y) for x, y in stats) == (k < last or bn == "frozen"), f"statistics of block {k}"


def test_epoch_0_scores_what_the_frozen_head_scored_and_outputs_are_reusable(tmp_path, cli, frozen):
    out = tmp_path / "ft"
    code, stdout, err = _finetune(cli, frozen, out)
    assert code == 0, err
    assert "test: balanced accuracy" in stdout
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # epoch 0: the frozen pipeline (the run's head, refitted without the validation rows) on them
    run = load_run(frozen["run"])
    store = FeatureStore(frozen["store"])
    ids = store.samples().image_id
    recorded = read_run_split(frozen["run"])
    fold_of = dict(zip(recorded.image_id, recorded.fold))
    folds = np.array([fold_of.get(i, -2) for i in ids])
    val, train = folds == 0, folds >= 1
    labels = np.array(store.samples().label, dtype=object)
    x = store.embeddings(TINY)
    head = type(run.head)(**run.head.get_params()).fit(x[train], labels[train])
    predicted = head.predict(x[val])
    frozen_ba = np.mean([np.mean(predicted[labels[val] == c] == c) for c in np.unique(labels[val])])
    assert history[0]["val_balanced_accuracy"] == pytest.approx(frozen_ba)
    # the epoch is chosen by validation AUC (threshold-free), the decision rule afterwards on those rows
    config = json.loads((out / "config.json").read_text())
    aucs = [-1.0 if h["val_auc"] is None else h["val_auc"] for h in history]
    assert config["chosen_by"] == "validation AUC" and config["best_epoch"] == int(np.argmax(aucs))
    threshold = config["decision"]["threshold"]["nv"]
    assert 0 < threshold < 1 and load_run(out).card["decision"] == config["decision"]
    for name in (
        "report.md",
        "report.html",
        "metrics.json",
        "test_predictions.csv",
        "run.json",
        "config.json",
        "plots/training_history.png",
        "backbone.pt",
        "embeddings.h5",
    ):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test", "validation"} <= set(metrics) and "auc" in metrics["test"]
    # the test rows are the frozen run's test rows
    test_ids = sorted(np.array(ids, dtype=object)[folds == TEST])
    expected = {r["image"]: r for r in csv.DictReader(open(out / "test_predictions.csv"))}
    assert sorted(expected) == test_ids
    # predict --run reproduces them
    folder = tmp_path / "new"
    folder.mkdir()
    for image_id in expected:
        shutil.copy(frozen["root"] / "data" / "img" / f"{image_id}.png", folder)
    code, _, err = cli("predict", "--run", out, "--images", folder, "--out", tmp_path / "p.csv", "--workers", "0")
    assert code == 0, err
    got = {r["image"]: r for r in csv.DictReader(open(tmp_path / "p.csv"))}
    assert all(abs(float(got[i]["mel"]) - float(expected[i]["mel"])) < 1e-5 for i in expected)
    # extract --weights RUN/backbone.pt re-embeds with the fine-tuned backbone (the run's store holds the
    # mean of the d8 views, finetune's default)
    assert FeatureStore(out / "embeddings.h5").views(TINY) == 8
    code, _, err = cli(
        "extract",
        "--data",
        frozen["manifest"],
        "--backbone",
        TINY,
        "--weights",
        out / "backbone.pt",
        "--out",
        tmp_path / "again.h5",
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--tta",
        "d8",
    )
    assert code == 0, err
    np.testing.assert_allclose(
        FeatureStore(tmp_path / "again.h5").embeddings(TINY),
        FeatureStore(out / "embeddings.h5").embeddings(TINY),
        atol=1e-5,
    )


def test_a_fresh_head_starts_from_chance(tmp_path, cli, frozen):
    code, _, err = cli(
        "finetune",
        "--data",
        frozen["manifest"],
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--features",
        frozen["store"],
        "--test-fraction",
        "0.34",
        "--folds",
        "2",
        "--allow-small-test",
        "--out",
        tmp_path / "fresh",
        *FAST,
    )
    assert code == 0, err
    history = json.loads((tmp_path / "fresh" / "history.json").read_text())
    assert history[0]["val_balanced_accuracy"] == 0.5  # zero weights: one class for everything


def test_kill_9_then_resume_finishes_like_an_uninterrupted_run(tmp_path, frozen):
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "finetune",
        "--data",
        str(frozen["manifest"]),
        "--backbone",
        TINY,
        "--init",
        str(frozen["run"]),
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--precision",
        "fp32",
        "--patience",
        "10",
        "--allow-small-test",
    ]
    whole = tmp_path / "whole"
    done = subprocess.run([*command, "--out", str(whole)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*command, "--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / CHECKPOINT).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "run.json").exists(), "finished before it could be killed"
    epoch = torch.load(killed / CHECKPOINT, weights_only=True)["epoch"]
    assert 1 <= epoch < 4
    again = subprocess.run([*command, "--out", str(killed), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    history = json.loads((killed / "history.json").read_text())
    reference = json.loads((whole / "history.json").read_text())
    assert [h["epoch"] for h in history] == [h["epoch"] for h in reference] == [0, 1, 2, 3, 4]
    for h, r in zip(history, reference):
        assert h["val_balanced_accuracy"] == pytest.approx(r["val_balanced_accuracy"], abs=1e-6)
        assert (h["loss"] is None and r["loss"] is None) or h["loss"] == pytest.approx(r["loss"], rel=1e-4)
    assert (killed / "report.md").is_file()
    a = {r["image"]: float(r["mel"]) for r in csv.DictReader(open(killed / "test_predictions.csv"))}
    b = {r["image"]: float(r["mel"]) for r in csv.DictReader(open(whole / "test_predictions.csv"))}
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-4 for i in a)


def test_refusals_and_faults(tmp_path, cli, frozen, monkeypatch):
    out = tmp_path / "ft"
    assert _finetune(cli, frozen, out)[0] == 0
    code, _, err = _finetune(cli, frozen, out)
    assert code == 2 and "--resume" in err  # never overwrites a checkpoint silently
    code, _, err = _finetune(cli, frozen, out, "--resume", "--lr", "0.1")
    assert code == 2 and "other options" in err and "lr" in err
    code, _, err = _finetune(cli, frozen, tmp_path / "x", "--unfreeze", "99")
    assert code == 2 and "blocks" in err
    xgb_run = tmp_path / "xgb"
    assert (
        cli(
            "fit",
            "--features",
            frozen["store"],
            "--head",
            "xgboost",
            "--out",
            xgb_run,
            "--folds",
            "2",
            "--trials",
            "1",
            "--test-fraction",
            "0.34",
            "--allow-small-test",
        )[0]
        == 0
    )
    code, _, err = cli(
        "finetune", "--data", frozen["manifest"], "--backbone", TINY, "--init", xgb_run, "--out", tmp_path / "y", *FAST
    )
    assert code == 2 and "linear or mlp" in err

    calls = []
    original = torch.save

    def full_disk(obj, path, *args, **kwargs):
        calls.append(path)
        if Path(path).name.startswith(f".{CHECKPOINT}") and len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = _finetune(cli, frozen, tmp_path / "disk", "--epochs", "3")
    assert code == 2 and "disk is full" in err and "--resume" in err
    assert torch.load(tmp_path / "disk" / CHECKPOINT, weights_only=True)["epoch"] >= 1  # the last whole one
    assert not list((tmp_path / "disk").glob(".*.tmp"))


def test_an_unreadable_training_image_is_listed_not_fatal(tmp_path, cli, frozen):
    data = tmp_path / "data"
    shutil.copytree(frozen["root"] / "data", data)
    (data / "img" / "g02_1.png").write_bytes(b"")  # a training row of the stored split
    code, _, err = cli(
        "finetune",
        "--data",
        data / "labels.csv",
        "--backbone",
        TINY,
        "--init",
        frozen["run"],
        "--out",
        tmp_path / "ft",
        *FAST,
    )
    assert code == 0, err
    failed = (tmp_path / "ft" / "failed.csv").read_text()
    assert "g02_1" in failed and "empty file" in failed


def _moving_average_run(frozen: dict, **options) -> dict:
    """FinetuneConfig options of a short run from the frozen head, with the moving average and mixup on."""
    return dict(
        data=str(frozen["manifest"]),
        backbone=TINY,
        init=str(frozen["run"]),
        patience=10,
        batch_size=8,
        workers=0,
        precision="fp32",
        lr=1e-2,
        backbone_lr=1e-2,
        ema=0.9,
        mixup=0.4,
        allow_small_test=True,
        **options,
    )


def test_ema_mixup_and_label_smoothing_resume_exactly(tmp_path, frozen, monkeypatch):
    """The moving average is what is validated and kept, and it survives an interruption."""
    base = _moving_average_run(frozen, epochs=3, label_smoothing=0.1)
    finetune(FinetuneConfig(out=str(tmp_path / "whole"), **base))
    reference = json.loads((tmp_path / "whole" / "history.json").read_text())
    state = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)
    ema = {k[len("module.") :]: v for k, v in state["ema"].items() if k.startswith("module.")}
    head = [k for k in state["model"] if k.startswith("head.") and k.endswith("weight")]
    assert head and not torch.allclose(ema[head[0]], state["model"][head[0]]), "the average must lag the weights"

    train_epoch = stages.train_epoch

    def interrupted(training, runtime, *, epoch, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return train_epoch(training, runtime, epoch=epoch, **kwargs)

    monkeypatch.setattr(stages, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(out=str(tmp_path / "cut"), **base))
    monkeypatch.setattr(stages, "train_epoch", train_epoch)
    finetune(FinetuneConfig(out=str(tmp_path / "cut"), resume=True, **base))
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    for h, r in zip(history, reference):
        assert h["val_auc"] == pytest.approx(r["val_auc"], abs=1e-6)
        assert (h["loss"] is None and r["loss"] is None) or h["loss"] == pytest.approx(r["loss"], rel=1e-5)


def test_refit_trains_again_on_every_study_row_and_resumes(tmp_path, frozen, monkeypatch):
    """Validation picks the epochs; the final model is the same training run again on all study rows."""
    base = _moving_average_run(frozen, epochs=2)
    validate, calls = stages.validate, []

    def rising(model, validation, **kwargs):  # every epoch's AUC beats the last, so validation chooses epoch 2
        scores = validate(model, validation, **kwargs)
        calls.append(scores.auc)
        return scores._replace(auc=float(len(calls)))

    monkeypatch.setattr(stages, "validate", rising)
    finetune(FinetuneConfig(out=str(tmp_path / "whole"), **base))
    whole = tmp_path / "whole"
    config = json.loads((whole / "config.json").read_text())
    folds = read_run_split(frozen["run"]).fold
    assert config["best_epoch"] == 2
    assert config["refit"] == {"epochs": 2, "rows": int(np.sum(folds >= 0)), "losses": config["refit"]["losses"]}
    assert torch.load(whole / REFIT_CHECKPOINT, weights_only=True)["epoch"] == 2
    chosen = torch.load(whole / BEST, weights_only=True)
    final = torch.load(whole / BACKBONE_FILE, weights_only=True)
    assert any(not torch.allclose(chosen[f"backbone.{k}"], v) for k, v in final.items() if v.is_floating_point())
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["validation"]["n"] == int(np.sum(folds == 0))  # the chosen epoch's, before the refit
    assert "before the refit" in (whole / "report.md").read_text()

    train_epoch = stages.train_epoch

    def interrupted(training, runtime, *, epoch, **kwargs):
        if len(training.rows) == int(np.sum(folds >= 0)) and epoch == 2:  # the refit's second epoch
            raise KeyboardInterrupt
        return train_epoch(training, runtime, epoch=epoch, **kwargs)

    monkeypatch.setattr(stages, "train_epoch", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(out=str(tmp_path / "cut"), **base))
    assert torch.load(tmp_path / "cut" / REFIT_CHECKPOINT, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(stages, "train_epoch", train_epoch)
    calls.clear()
    finetune(FinetuneConfig(out=str(tmp_path / "cut"), resume=True, **base))
    resumed = torch.load(tmp_path / "cut" / BACKBONE_FILE, weights_only=True)
    for k, v in final.items():
        assert torch.allclose(resumed[k].float(), v.float(), atol=1e-5), k


def test_a_checkpoint_refuses_other_options_and_saves_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT
    Checkpoint(path, {"lr": 1e-3, "epochs": 2}).save({"epoch": 1, "best": {"epoch": 1, "auc": 0.7}})
    assert Checkpoint(path, {"lr": 1e-3, "epochs": 2}).resume()["epoch"] == 1
    with pytest.raises(FinetuneError, match=r"other options \(lr\)"):
        Checkpoint(path, {"lr": 0.1, "epochs": 2}).resume()
    assert Checkpoint(path, {"lr": 0.1, "epochs": 2}).resume(other_options="restart") is None
    Checkpoint(path, {"lr": 1e-3}).save({"epoch": 1, "best": {"epoch": 1, "balanced_accuracy": 0.7}})
    with pytest.raises(FinetuneError, match="older version"):
        Checkpoint(path, {"lr": 1e-3}).resume()

    before = path.read_bytes()
    original = torch.save

    def dies_halfway(obj, file, *args, **kwargs):
        Path(file).write_bytes(b"half a checkpoint")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError):
        Checkpoint(path, {"lr": 1e-3}).save({"epoch": 2, "best": {"epoch": 2, "auc": 0.8}})
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", original)
    assert Checkpoint(path).load()["epoch"] == 1


def test_lr_decay_rates_each_unfrozen_block_below_the_one_above_and_old_checkpoints_still_resume():
    backbone = load_backbone(TINY, "none")
    frozen, trainable = model.trainable_blocks(backbone, "3")
    assert len(trainable) == 3 and frozen
    head = model.head_module(None, 2, (np.zeros(backbone.dim), np.ones(backbone.dim)))
    cfg = FinetuneConfig(backbone_lr=1e-3, lr=1e-2, lr_decay=0.5, weight_decay=0.0)
    optimizer = model.build_optimizer(model.Model(backbone.module, head), trainable, cfg)
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    for depth, block in enumerate(reversed(trainable)):  # the top block first
        rates = [rate_of[id(p)] for m in block for p in m.parameters()]
        assert rates == pytest.approx([1e-3 * 0.5**depth] * len(rates)), depth
    assert {rate_of[id(p)] for p in head.parameters()} == {1e-2}
    assert not any(id(p) in rate_of for m in frozen for p in m.parameters())
    # a checkpoint written before --lr-decay existed records no lr_decay: the default still matches it
    assert "lr_decay" not in stages.checkpoint_options(FinetuneConfig())
    assert stages.checkpoint_options(cfg)["lr_decay"] == 0.5
