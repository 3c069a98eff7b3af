"""End to end: data sets in, feature stores out; failures, views, several backbones, resume, reruns."""

from __future__ import annotations

import csv
import importlib.util
import multiprocessing
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from imagefiles import csv_data_set, lesion, mixed_folder, save, lesion_set

import extract.run as run
from extract import compiled, dataset, decoding, runtimes
from extract.backbones import TorchvisionFamily, backbone_spec, get_family
from extract.manifest import read_manifest
from extract.runtimes import RuntimeUnavailable
from extract.run import ConfigError, ExtractConfig, extract
from extract.shards import rows_to_do
from extract.summary import Summary
from features.store import FORMAT, FeatureStore, Journal, StoreError, journal_folder

FP32 = ("--precision", "fp32", "--workers", "0")
DIM = 400  # TINY's embedding size


def _extract(data: Path, out: Path, *extra: str, backbone: str = TINY, **cfg) -> Summary:
    """Extract in this process; fp32 so that results are comparable bit for bit between runs."""
    return extract(
        ExtractConfig(
            data=str(data),
            backbone=backbone,
            weights="none",
            out=str(out),
            **{"precision": "fp32", "workers": 0, **cfg},
        )
    )


def test_mixed_folder_embeds_good_images_and_lists_bad_ones(tmp_path, cli):
    kinds = mixed_folder(tmp_path / "data")
    out = tmp_path / "store.h5"
    code, stdout, stderr = cli(
        "extract", "--data", tmp_path / "data", "--backbone", TINY, "--weights", "none", "--out", out, *FP32
    )
    assert code == 0, stderr
    assert "RANDOM" in stderr and "RANDOM INIT" in stdout
    store = FeatureStore(out)
    samples = store.samples()
    assert sorted(samples.image_id) == sorted(kinds)
    done = dict(zip(samples.image_id, store.done(TINY)))
    assert {i for i, ok in done.items() if ok} == {i for i, k in kinds.items() if k == "good"}
    failed = store.failed()
    assert set(failed) == {i for i, k in kinds.items() if k == "bad"}
    assert "truncated" in failed["truncated"] and "empty" in failed["empty"] and "not an image" in failed["text"]
    for image_id in failed:
        assert image_id in stdout  # the summary lists each failure
    labels = dict(zip(samples.image_id, samples.label))
    assert labels["cmyk"] == "mel" and labels["sixteen"] == "nv"
    x = store.embeddings(TINY)
    row = {i: r for r, i in enumerate(samples.image_id)}
    np.testing.assert_allclose(x[row["rotated_twin"]], x[row["good_nv_0"]], atol=1e-5)
    assert not np.allclose(x[row["good_nv_1"]], x[row["good_nv_0"]], atol=1e-3)
    attrs = store.backbone_attrs(TINY)
    assert attrs["random_init"] and attrs["weights"] == "none" and attrs["dim"] == DIM
    assert attrs["precision"] == "fp32" and attrs["views"] == "none" and len(attrs["fingerprint"]) == 16
    assert store.attrs["format"] == FORMAT and store.attrs["format_version"] == 1
    assert json.loads(store.attrs["extract_config"])["backbone"] == TINY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "store.h5"]  # no temporary file left
    code, _, _ = cli(
        "extract", "--data", tmp_path / "data", "--backbone", TINY, "--weights", "none", "--out", out, "--strict", *FP32
    )
    assert code == 1  # --strict: failures make the exit status non-zero


def test_store_layout_follows_format_1(tmp_path):
    manifest = csv_data_set(tmp_path, 5)
    _extract(manifest, tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5") as f:
        for name in ("image_id", "path", "label", "group", "sha256"):
            assert f[f"samples/{name}"].shape == (5,) and f[f"samples/{name}"].dtype.kind == "O"
        assert f["samples/path"].asstr()[0] == "img/im000.jpg"
        assert list(f["samples/group"].asstr()[:3]) == ["L0", "L0", "L1"]
        age = f["samples/meta/age"][()]
        assert age.dtype == np.float64 and np.isnan(age[3]) and age[4] == 34.0
        assert list(f["samples/meta/site"].asstr()[()]) == ["back"] * 5
        group = f[f"embeddings/{TINY}"]
        assert group["data"].shape == (5, DIM) and group["data"].dtype == np.float32
        assert group["done"][()].all() and "views" not in group
        for key in (
            "weights",
            "weights_sha256",
            "input_size",
            "resize",
            "mean",
            "std",
            "precision",
            "views",
            "torch_version",
            "torchvision_version",
            "fingerprint",
        ):
            assert key in group.attrs, key
        assert f["failed/image_id"].shape == (0,)
        import hashlib

        assert f["samples/sha256"].asstr()[0] == hashlib.sha256((tmp_path / "img/im000.jpg").read_bytes()).hexdigest()


READS = {"pil": (dataset, "load_image"), "torch": (decoding, "read_image_file")}
"""Where each decoder reads (and, with --workers 0, decodes) a file in this process."""


@pytest.mark.parametrize("decode", list(READS))
def test_several_backbones_decode_each_image_once(tmp_path, monkeypatch, decode):
    manifest = csv_data_set(tmp_path, 6)
    calls = []
    module, name = READS[decode]
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda path: calls.append(path) or original(path))
    both = f"{TINY},efficientnet_lite0"
    summary = _extract(manifest, tmp_path / "both.h5", backbone=both, decode=decode)
    assert len(calls) == 6
    assert summary.embedded == {TINY: 6, "efficientnet_lite0": 6}
    store = FeatureStore(tmp_path / "both.h5")
    assert store.backbones == sorted([TINY, "efficientnet_lite0"])
    alone = _extract(manifest, tmp_path / "lite.h5", backbone="efficientnet_lite0", decode=decode)
    assert alone.embedded == {"efficientnet_lite0": 6}
    # each backbone got its own preprocessing (Lite0: (x - 127) / 128), not the other's
    np.testing.assert_allclose(
        store.embeddings("efficientnet_lite0"),
        FeatureStore(tmp_path / "lite.h5").embeddings("efficientnet_lite0"),
        atol=1e-5,
    )


@pytest.mark.parametrize("tta,n_views", [("flip", 2), ("d8", 8)])
def test_test_time_views(tmp_path, tta, n_views):
    manifest = csv_data_set(tmp_path, 3)
    _extract(manifest, tmp_path / "plain.h5")
    _extract(manifest, tmp_path / "views.h5", tta=tta)
    plain = FeatureStore(tmp_path / "plain.h5").embeddings(TINY)
    store = FeatureStore(tmp_path / "views.h5")
    views = store.embeddings(TINY, views=True)
    assert views.shape == (3, n_views, DIM)
    np.testing.assert_allclose(store.embeddings(TINY), views.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(views[:, 0], plain, atol=1e-5)  # the first view is the image itself
    assert not np.allclose(views[:, 1], views[:, 0], atol=1e-3)
    assert store.backbone_attrs(TINY)["views"] == tta


def test_more_images_embeds_only_the_new_ones(tmp_path):
    first = csv_data_set(tmp_path, 4, "first.csv")
    full = csv_data_set(tmp_path, 7, "full.csv")
    out = tmp_path / "s.h5"
    _extract(first, out)
    before = FeatureStore(out).embeddings(TINY)
    summary = _extract(full, out)
    assert summary.embedded == {TINY: 3}
    store = FeatureStore(out)
    assert store.samples().image_id == [f"im{k:03d}" for k in range(7)]
    assert np.array_equal(store.embeddings(TINY)[:4], before)
    _extract(full, tmp_path / "fresh.h5")
    np.testing.assert_allclose(store.embeddings(TINY), FeatureStore(tmp_path / "fresh.h5").embeddings(TINY), atol=1e-5)
    size = out.stat().st_size
    assert _extract(full, out).embedded == {TINY: 0}
    assert out.stat().st_size == size  # rewritten compactly: reruns do not leak HDF5 free space


def test_a_changed_image_file_is_embedded_again(tmp_path):
    manifest = csv_data_set(tmp_path, 4)
    out = tmp_path / "s.h5"
    _extract(manifest, out)
    old_sha, old_x = FeatureStore(out).samples().sha256, FeatureStore(out).embeddings(TINY)
    save(tmp_path / "img" / "im002.jpg", lesion(99), quality=90)
    assert _extract(manifest, out).embedded == {TINY: 1}
    new = FeatureStore(out)
    assert new.samples().sha256[2] != old_sha[2] and new.samples().sha256[:2] == old_sha[:2]
    assert not np.allclose(new.embeddings(TINY)[2], old_x[2], atol=1e-3)
    assert np.array_equal(new.embeddings(TINY)[[0, 1, 3]], old_x[[0, 1, 3]])


def test_other_settings_are_refused_unless_overwrite(tmp_path, cli):
    manifest = csv_data_set(tmp_path, 3)
    out = tmp_path / "s.h5"
    _extract(manifest, out)
    stamp = out.stat().st_mtime_ns
    code, _, err = cli(
        "extract", "--data", manifest, "--backbone", TINY, "--weights", "none", "--out", out, "--tta", "flip", *FP32
    )
    assert code == 2 and "views: store 'none', now 'flip'" in err and "--overwrite" in err
    assert out.stat().st_mtime_ns == stamp and not journal_folder(out).exists()
    code, _, err = cli(
        "extract",
        "--data",
        manifest,
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--out",
        out,
        "--tta",
        "flip",
        "--overwrite",
        *FP32,
    )
    assert code == 0, err
    assert FeatureStore(out).embeddings(TINY, views=True).shape == (3, 2, DIM)


def test_a_weights_file_that_does_not_load_leaves_nothing_that_refuses_the_corrected_rerun(tmp_path, cli):
    """A weights file is loaded only when there is something to embed, after the journal was started:
    the failed run must not leave that journal, whose fingerprints (the bad file's digest) would
    refuse the rerun with the right file."""
    manifest = csv_data_set(tmp_path, 2)
    out, weights = tmp_path / "s.h5", tmp_path / "w.pth"
    torch.save({"not.a.layer": torch.zeros(3)}, weights)
    args = ["extract", "--data", manifest, "--backbone", TINY, "--weights", weights, "--out", out, *FP32]
    code, _, err = cli(*args)
    assert code == 2 and "not a state dict of" in err
    assert not out.exists() and not journal_folder(out).exists()
    torch.save(get_family(TINY).architecture().state_dict(), weights)
    code, _, err = cli(*args)
    assert code == 0, err
    assert FeatureStore(out).done(TINY).all()


def test_manifest_errors_stop_before_any_work(tmp_path, cli):
    manifest = csv_data_set(tmp_path, 3)
    rows = manifest.read_text().splitlines()
    (tmp_path / "dup.csv").write_text("\n".join(rows + [rows[1]]) + "\n")
    code, _, err = cli(
        "extract", "--data", tmp_path / "dup.csv", "--backbone", TINY, "--weights", "none", "--out", tmp_path / "s.h5"
    )
    assert code == 2 and "duplicate image ids" in err and "im000" in err
    code, _, err = cli(
        "extract", "--data", manifest, "--images", tmp_path / "nowhere", "--backbone", TINY, "--out", tmp_path / "s.h5"
    )
    assert code == 2 and "nowhere" in err
    assert not (tmp_path / "s.h5").exists() and not journal_folder(tmp_path / "s.h5").exists()


def test_interrupted_assembly_is_redone_from_the_journal(tmp_path, monkeypatch):
    manifest = csv_data_set(tmp_path, 5)
    out = tmp_path / "s.h5"

    read = Journal.read

    def crash(journal):  # every chunk copied into the new store, then interrupted before its rename
        yield from read(journal)
        raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "read", crash)
    with pytest.raises(KeyboardInterrupt):
        _extract(manifest, out, flush_rows=2, batch_size=2)
    monkeypatch.undo()
    assert not out.exists() and len(Journal(journal_folder(out)).chunks()) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s.h5")) == ["s.h5.partial"]
    assert _extract(manifest, out).embedded == {TINY: 0}  # all rows came from the journal
    _extract(manifest, tmp_path / "fresh.h5")
    np.testing.assert_allclose(
        FeatureStore(out).embeddings(TINY), FeatureStore(tmp_path / "fresh.h5").embeddings(TINY), atol=1e-5
    )
    assert not journal_folder(out).exists()


def test_kill_9_then_rerun_resumes_to_the_same_store(tmp_path):
    manifest = csv_data_set(tmp_path, 48)
    out = tmp_path / "killed.h5"
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "extract",
        "--data",
        str(manifest),
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--flush-rows",
        "4",
        *FP32,
    ]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = Journal(journal_folder(out))
    deadline = time.monotonic() + 120
    while len(journal.chunks()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed; make it longer"
    done_before = sum(len(ids) for ids in journal.done_ids().values())
    assert 12 <= done_before < 48
    summary = _extract(manifest, out)
    assert summary.embedded[TINY] == 48 - done_before
    store = FeatureStore(out)
    assert store.samples().image_id == [f"im{k:03d}" for k in range(48)]
    assert store.done(TINY).all()
    _extract(manifest, tmp_path / "whole.h5")
    np.testing.assert_allclose(store.embeddings(TINY), FeatureStore(tmp_path / "whole.h5").embeddings(TINY), atol=1e-5)


def test_real_isic_images_with_metadata(tmp_path, shared_data):
    source = shared_data / "isic_cc0_200"
    rows = list(csv.DictReader(open(source / "labels.csv")))[:6]
    manifest = tmp_path / "six.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = extract(
        ExtractConfig(
            data=str(manifest), images=str(source), backbone="efficientnet_lite0", out=str(tmp_path / "s.h5"), workers=0
        )
    )
    assert summary.embedded == {"efficientnet_lite0": 6} and not summary.failed
    store = FeatureStore(tmp_path / "s.h5")
    samples = store.samples()
    assert samples.label == [r["label"] for r in rows]
    assert samples.meta["sex"] == [r["sex"] for r in rows]
    assert store.attrs["data_root"] == str(source.resolve())
    x = store.embeddings("efficientnet_lite0")
    assert x.shape == (6, 1280) and np.isfinite(x).all() and (x >= 0).all()  # ReLU6 before pooling
    assert not store.backbone_attrs("efficientnet_lite0")["random_init"]


def test_backbones_command_lists_the_registry(cli):
    code, out, _ = cli("backbones")
    assert code == 0
    for name, dim in [
        ("resnet50", 2048),
        ("vgg11", 4096),
        ("densenet121", 1024),
        ("inception_v3", 2048),
        ("efficientnet_lite0", 1280),
    ]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert str(dim) in line
    assert "299px" in next(line for line in out.splitlines() if line.startswith("inception_v3"))
    assert "torchvision:<name>" in out


@pytest.mark.parametrize("decode", list(READS))
def test_ctrl_c_keeps_the_rows_already_embedded(tmp_path, monkeypatch, decode):
    manifest = csv_data_set(tmp_path, 8)
    out = tmp_path / "s.h5"
    module, name = READS[decode]
    original, calls = getattr(module, name), []

    def interrupted(path):  # Ctrl-C while the fifth image is read (in this process: --workers 0)
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(path)

    monkeypatch.setattr(module, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _extract(manifest, out, batch_size=2, flush_rows=100, decode=decode)
    monkeypatch.undo()
    assert sum(len(ids) for ids in Journal(journal_folder(out)).done_ids().values()) == 4  # 2 batches
    assert _extract(manifest, out, decode=decode).embedded == {TINY: 4}
    assert FeatureStore(out).done(TINY).all()


def test_compile_caches_one_package_that_later_runs_load(tmp_path, monkeypatch, caplog, compiled_cache):
    """--compile on: one real ahead-of-time compilation, every batch padded to its one
    shape, the same embeddings as eager; the package is cached, so a later `auto` run of a few images
    loads it instead of compiling (exporting is made to fail to prove it) and gets the same rows."""
    manifest = csv_data_set(tmp_path, 7)
    eager = _extract(manifest, tmp_path / "eager.h5", batch_size=4, runtime="torch")
    assert eager.steady_images_per_s > 0
    shapes, load_or_compile = [], compiled.load_or_compile

    def recording(*args):
        runner = load_or_compile(*args)
        return lambda x: shapes.append(tuple(x.shape)) or runner(x)

    monkeypatch.setattr(compiled, "load_or_compile", recording)
    _extract(manifest, tmp_path / "compiled.h5", batch_size=4, compile="on", runtime="torch")
    assert shapes == [(4, 3, 224, 224)] * 2
    packages = list(compiled_cache.glob("*.pt2"))
    assert len(packages) == 1 and packages[0].name.startswith("torchvision_regnet_x_400mf-fp32-")
    embeddings = {name: FeatureStore(tmp_path / f"{name}.h5").embeddings(TINY) for name in ("eager", "compiled")}
    np.testing.assert_allclose(embeddings["compiled"], embeddings["eager"], rtol=1e-4, atol=1e-5)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the package is cached")

    monkeypatch.setattr(compiled.torch.export, "export", no_export)
    with caplog.at_level("WARNING", logger="extract"):
        _extract(manifest, tmp_path / "cached.h5", batch_size=4, runtime="torch")  # --compile auto, 7 images
    assert "uncompiled" not in caplog.text and "cannot load" not in caplog.text and len(shapes) == 4
    np.testing.assert_array_equal(FeatureStore(tmp_path / "cached.h5").embeddings(TINY), embeddings["compiled"])
    # another batch size is another package: not cached, and 7 images are too few for `auto` to compile
    _extract(manifest, tmp_path / "other.h5", batch_size=3, runtime="torch")
    assert len(shapes) == 4 and len(list(compiled_cache.glob("*.pt2"))) == 1


def test_compile_falls_back_to_eager_on_a_bad_package_or_a_failing_compiler(
    tmp_path, monkeypatch, caplog, compiled_cache
):
    """A package that does not load is deleted and compiled again; a compiler that fails warns and
    leaves the eager module doing the work, with the same embeddings."""
    manifest = csv_data_set(tmp_path, 5)
    eager = _extract(manifest, tmp_path / "eager.h5", batch_size=4, runtime="torch")
    assert eager.embedded == {TINY: 5}

    def no_compiler(*args, **kwargs):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(compiled.torch._inductor, "aoti_compile_and_package", no_compiler)
    compiled_cache.mkdir(parents=True, exist_ok=True)
    identity = backbone_spec(TINY, "none").identity()
    bad = compiled.package_path(TINY, identity, "fp32", (4, 3, 224, 224), torch.device("cpu"))
    bad.write_bytes(b"not a package")
    compiled.record(bad)  # ours (recorded), yet it cannot be loaded
    with caplog.at_level("WARNING", logger="extract"):
        _extract(manifest, tmp_path / "fallback.h5", batch_size=4, runtime="torch")  # cached, so it tries to load
    assert "cannot load this compiled package" in caplog.text and "no C++ compiler" in caplog.text
    assert "running it uncompiled" in caplog.text and not bad.exists()
    np.testing.assert_allclose(
        FeatureStore(tmp_path / "fallback.h5").embeddings(TINY),
        FeatureStore(tmp_path / "eager.h5").embeddings(TINY),
        rtol=1e-5,
        atol=1e-6,
    )


def test_cache_keeps_the_most_recently_used_packages_within_its_limit(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        (tmp_path / f"{name}.pt2").write_bytes(b"x" * 100)
        compiled.record(tmp_path / f"{name}.pt2")
        os.utime(compiled.marker_path(tmp_path / f"{name}.pt2"), (1e9 - age, 1e9 - age))
    (tmp_path / "new.pt2").write_bytes(b"x" * 100)
    compiled.record(tmp_path / "new.pt2")
    (tmp_path / "other.123.partial.pt2").write_bytes(b"x" * 1000)  # another process's unfinished package
    removed = compiled.evict(tmp_path, keep=tmp_path / "new.pt2", limit=250)
    assert [p.name for p in removed] == ["oldest.pt2", "middle.pt2"]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(compiled.MARKER_SUFFIX))
    assert left == ["new.pt2", "newest.pt2", "other.123.partial.pt2"]


def test_package_names_change_with_everything_compiled_into_them():
    identity = backbone_spec(TINY, "none").identity()
    cpu = torch.device("cpu")
    base = compiled.package_path(TINY, identity, "bf16", (16, 3, 224, 224), cpu)
    assert base == compiled.package_path(TINY, dict(identity), "bf16", (16, 3, 224, 224), cpu)
    others = [
        compiled.package_path(TINY, {**identity, "weights_sha256": "0" * 64}, "bf16", (16, 3, 224, 224), cpu),
        compiled.package_path(TINY, identity, "fp32", (16, 3, 224, 224), cpu),
        compiled.package_path(TINY, identity, "bf16", (32, 3, 224, 224), cpu),
        compiled.package_path(TINY, identity, "bf16", (16, 3, 224, 224), torch.device("meta")),
    ]
    assert len({base, *others}) == 5


def test_openvino_runtime_agrees_with_torch_and_reads_its_cached_model(tmp_path, monkeypatch, compiled_cache):
    """--runtime openvino: the same embeddings as torch to fp32 rounding (a short last batch padded),
    recorded in the store and its fingerprint; the converted model is cached, so a second run reads it
    instead of converting (conversion is made to fail to prove it)."""
    openvino = pytest.importorskip("openvino")
    manifest = csv_data_set(tmp_path, 7)
    torch_store, ov_store = tmp_path / "torch.h5", tmp_path / "ov.h5"
    _extract(manifest, torch_store, batch_size=4, runtime="torch")
    assert _extract(manifest, ov_store, batch_size=4, runtime="openvino").embedded == {TINY: 7}
    expected = FeatureStore(torch_store).embeddings(TINY)
    np.testing.assert_allclose(FeatureStore(ov_store).embeddings(TINY), expected, rtol=1e-4, atol=1e-5)
    attrs = {name: FeatureStore(path).backbone_attrs(TINY) for name, path in (("torch", torch_store), ("ov", ov_store))}
    assert attrs["ov"]["runtime"] == "openvino" and attrs["torch"]["runtime"] == "torch"
    assert attrs["ov"]["openvino_version"] == openvino.__version__ and "openvino_version" not in attrs["torch"]
    assert attrs["ov"]["fingerprint"] != attrs["torch"]["fingerprint"]
    assert [p.suffix for p in compiled_cache.iterdir() if not p.name.endswith(compiled.MARKER_SUFFIX)] == [".ov"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the model is cached")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    _extract(manifest, tmp_path / "again.h5", batch_size=4, runtime="openvino")
    np.testing.assert_array_equal(
        FeatureStore(tmp_path / "again.h5").embeddings(TINY), FeatureStore(ov_store).embeddings(TINY)
    )
    with pytest.raises(StoreError, match="runtime: store 'openvino', now 'torch'"):
        _extract(manifest, ov_store, batch_size=4, runtime="torch")  # never mixed in one store


def test_int8_is_calibrated_on_the_data_set_and_predict_reuses_that_model(tmp_path, monkeypatch, compiled_cache):
    """--precision int8 (OpenVINO): NNCF calibrates on the data set's first images; their digest is in
    the fingerprint (another data set: another calibration, another fingerprint) and names the cached
    model. Given that digest, as `predict` gives it, images are embedded with that same model without
    calibrating again; a digest whose model is not cached is refused before any image is read."""
    nncf = pytest.importorskip("nncf")
    manifest, other = csv_data_set(tmp_path, 6), csv_data_set(tmp_path / "other", 5, start=50)
    _extract(manifest, tmp_path / "fp32.h5", batch_size=4, runtime="torch")
    _extract(manifest, tmp_path / "int8.h5", batch_size=4, precision="int8")
    _extract(other, tmp_path / "other.h5", batch_size=4, precision="int8")
    int8, fp32 = (FeatureStore(tmp_path / f"{name}.h5") for name in ("int8", "fp32"))
    cosine = np.sum(int8.embeddings(TINY) * fp32.embeddings(TINY), axis=1) / (
        np.linalg.norm(int8.embeddings(TINY), axis=1) * np.linalg.norm(fp32.embeddings(TINY), axis=1)
    )
    assert cosine.min() > 0.98, cosine  # quantised, not garbage
    attrs, other_attrs = int8.backbone_attrs(TINY), FeatureStore(tmp_path / "other.h5").backbone_attrs(TINY)
    assert attrs["precision"] == "int8" and attrs["runtime"] == "openvino" and len(attrs["calibration"]) == 16
    assert other_attrs["calibration"] != attrs["calibration"]
    assert other_attrs["fingerprint"] != attrs["fingerprint"]

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated again although the model is cached")

    monkeypatch.setattr(nncf, "quantize", no_calibration)
    again = tmp_path / "again.h5"  # another batch size too: the cached model is reshaped, not made anew
    _extract(manifest, again, batch_size=3, precision="int8", calibration=attrs["calibration"])
    assert FeatureStore(again).backbone_attrs(TINY)["fingerprint"] == attrs["fingerprint"]
    np.testing.assert_allclose(FeatureStore(again).embeddings(TINY), int8.embeddings(TINY), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeUnavailable, match="not in this machine's cache"):
        _extract(manifest, tmp_path / "unknown.h5", batch_size=4, precision="int8", calibration="0" * 16)
    with pytest.raises(ConfigError, match="int8 runs on --runtime openvino only"):
        _extract(manifest, tmp_path / "torch.h5", precision="int8", runtime="torch")


def test_runtime_auto_is_openvino_on_cpus_where_installed(monkeypatch):
    """`auto` takes OpenVINO only where it runs (a CPU, the package installed, a precision it has), and
    a runtime asked for by name that cannot run is refused before anything is read, saying why."""
    installed = importlib.util.find_spec("openvino") is not None
    assert runtimes.resolve_runtime("auto", "cpu", "bf16") == ("openvino" if installed else "torch")
    assert runtimes.resolve_runtime("auto", "cpu", "fp16") == "torch"
    assert runtimes.resolve_runtime("auto", "cuda", "bf16") == "torch"
    with pytest.raises(runtimes.RuntimeUnavailable, match="CPU only"):
        runtimes.resolve_runtime("openvino", "cuda", "bf16")
    monkeypatch.setattr(runtimes.importlib.util, "find_spec", lambda name: None)
    assert runtimes.resolve_runtime("auto", "cpu", "bf16") == "torch"
    with pytest.raises(ConfigError, match=r"pip install 'skinlesion\[openvino\]'"):
        ExtractConfig(backbone=TINY, device="cpu", runtime="openvino").resolved()
    with pytest.raises(ConfigError, match="choose auto, torch, openvino"):
        ExtractConfig(backbone=TINY, device="cpu", runtime="tensorrt").resolved()


def test_device_defaults_follow_what_bounds_each_device(monkeypatch):
    """A GPU machine decodes with all cores but one and does not compile under `auto`; a CPU shares
    its cores with the model (4 decoders at most) and compiles from COMPILE_FROM images, or for any
    number once the package is cached."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert run.default_workers("cuda") == 15 and run.default_workers("cuda:1") == 15
    assert run.default_workers("cpu") == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert run.default_workers("cpu") == 1 and run.default_workers("cuda") == 1
    big, compiles = runtimes.COMPILE_FROM, runtimes.compiles
    assert compiles("auto", "cpu", big) and not compiles("auto", "cpu", big - 1)
    assert not compiles("auto", "cuda", 10 * big) and compiles("on", "cuda", 1)
    assert not compiles("off", "cpu", 10 * big)
    assert compiles("auto", "cpu", 1, cached=True) and not compiles("auto", "cuda", 1, cached=True)
    assert not compiles("off", "cpu", 1, cached=True)


def test_cuda_settings_make_fp32_exact_and_are_restored():
    """On a GPU, fp32 turns TF32 off (and cuDNN's autotuner on) only inside the extraction; the
    switches are process-wide, so they must come back as they were. They are plain flags: this runs
    without a GPU."""

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        with run.cuda_settings(torch.device("cuda"), "fp32"):
            assert cudnn.benchmark and not cudnn.allow_tf32 and not matmul.allow_tf32
        assert cudnn.allow_tf32 and matmul.allow_tf32 and cudnn.benchmark == before[0]
        with run.cuda_settings(torch.device("cuda"), "bf16"):
            assert cudnn.benchmark and cudnn.allow_tf32
        with run.cuda_settings(torch.device("cpu"), "fp32"):
            assert cudnn.allow_tf32 and cudnn.benchmark == before[0]
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = before


def test_steady_rate_ignores_the_prefetched_start():
    """Workers prefetch batches while the model starts: those arrive at once and must not count.
    Steady state is the second half of the images."""
    rate = run.Throughput()
    times = [0.0, 0.01, 0.02, 0.03, 1.0, 2.0, 3.0, 4.0]  # 4 prefetched batches, then 1 s each
    rate.marks = [(t, 64 * (i + 1)) for i, t in enumerate(times)]
    assert rate.steady() == pytest.approx(4 * 64 / (4.0 - 0.03))
    rate.marks = rate.marks[:1]
    assert rate.steady() == 0.0
    rate.add(64)
    assert rate.marks[-1][1] == 128 and rate.steady() > 0


def test_cpu_decoding_workers_yield_to_the_model(tmp_path):
    """On a CPU the loader's workers start at the lowest priority (they preempted the model's threads);
    run in a child process, since niceness cannot be lowered again."""
    code = "import os, extract.run as r; before = os.nice(0); r.yield_to_the_model(0); print(before, os.nice(0))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = map(int, done.stdout.split())
    assert after == 19 or (before >= 19 and after == before)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_decoding_workers_give_the_store_of_decoding_in_process(tmp_path, start):
    """--workers 2 decodes in other processes: the same rows, hashes, failures and embeddings as
    --workers 0. Under `spawn` (macOS's and Windows' default; Python 3.14 on Linux has `forkserver`)
    the dataset, its preprocessing, the collate and worker-init functions are pickled to the workers;
    under `fork` (Linux before 3.14) they are inherited."""
    manifest = csv_data_set(tmp_path, 7)
    (tmp_path / "img" / "im002.jpg").write_text("not an image\n")  # a failure crosses the process boundary too
    _extract(manifest, tmp_path / "in-process.h5", batch_size=2, runtime="torch")
    in_process = FeatureStore(tmp_path / "in-process.h5")
    out = tmp_path / f"{start}.h5"
    assert start in multiprocessing.get_all_start_methods()
    command = (
        "import multiprocessing, sys; multiprocessing.set_start_method(sys.argv[1]); "
        "import cli; sys.exit(cli.main(sys.argv[2:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", command, start, "extract", "--data", str(manifest), "--out", str(out)]
        + ["--backbone", TINY, "--weights", "none", "--precision", "fp32", "--runtime", "torch"]
        + ["--batch-size", "2", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    workers = FeatureStore(out)
    assert json.loads(workers.attrs["extract_config"])["workers"] == 2
    assert workers.samples().image_id == in_process.samples().image_id
    assert workers.samples().sha256 == in_process.samples().sha256
    assert workers.failed() == in_process.failed() and set(workers.failed()) == {"im002"}
    assert np.array_equal(workers.done(TINY), in_process.done(TINY)) and workers.done(TINY).sum() == 6
    np.testing.assert_allclose(workers.embeddings(TINY), in_process.embeddings(TINY), rtol=1e-6, atol=1e-6)


def test_planning_and_nothing_to_do_build_no_network(tmp_path, monkeypatch):
    """The plan (and each torchrun rank's share of it) comes from the backbones' specs: a rerun with
    nothing new, and `rows_to_do`, never build a network. (A `torchvision:<name>` backbone outside the
    registry is built once per process to learn its embedding size; the first extraction did that.)"""
    first, full = csv_data_set(tmp_path, 4, "first.csv"), csv_data_set(tmp_path, 7, "full.csv")
    out = tmp_path / "s.h5"
    _extract(first, out)

    def no_building(self):
        raise AssertionError(f"{self.name} was built")

    monkeypatch.setattr(TorchvisionFamily, "architecture", no_building)
    cfg = ExtractConfig(data=str(full), backbone=TINY, weights="none", out=str(out), precision="fp32")
    assert rows_to_do(cfg, read_manifest(str(full))).tolist() == [4, 5, 6]
    assert _extract(first, out).embedded == {TINY: 0}
    with pytest.raises(AssertionError, match="was built"):
        _extract(full, out)  # new images: now the network is built


def test_predict_on_a_machine_without_the_runs_int8_model_says_so_in_one_line(tmp_path, cli, monkeypatch):
    """An int8 run's backbone is the model calibrated where the run was made; on a machine (here: a
    cache) without it, `predict` says what to do, with the user-error status, not a traceback."""
    pytest.importorskip("nncf")
    manifest = lesion_set(tmp_path / "data", 6)
    store, run = tmp_path / "int8.h5", tmp_path / "run"
    options = ("--backbone", TINY, "--weights", "none", "--workers", "0", "--batch-size", "4")
    code, _, err = cli("extract", "--data", manifest, "--out", store, "--precision", "int8", *options)
    assert code == 0, err
    split = ("--folds", "2", "--trials", "1", "--test-fraction", "0.34", "--allow-small-test")
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", run, *split)
    assert code == 0, err
    monkeypatch.setenv("SKINLESION_CACHE", str(tmp_path / "another-machine"))
    images = tmp_path / "data" / "img"
    code, _, err = cli("predict", "--run", run, "--images", images, "--out", tmp_path / "p.csv", "--workers", "0")
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(said) == 1 and "not in this machine's cache" in said[0], err
