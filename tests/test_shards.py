"""torchrun-sharded extraction with 2 CPU processes (gloo): the same store as one process, and a
killed rank resumed without redoing finished work."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY
from imagefiles import csv_data_set

from features.lock import StoreLock
from features.store import FeatureStore, journal_folder

VIT = "timm:vit_tiny_patch16_224"
"""A timm transformer beside the torchvision CNN, with options of its own (each rank builds it alike)."""
COMMON = ["--weights", "none", "--precision", "fp32", "--batch-size", "2", "--flush-rows", "2"]
CNN = ("--backbone", TINY)
BOTH = ("--backbone", f"{TINY},{VIT}", "--input-size", "0,32", "--pool", "auto,token+avg", "--runtime", "torch")
"""(On torch: each rank would otherwise convert both models for OpenVINO, which the other tests cover.)"""


def _torchrun(manifest: Path, out: Path, backbones: tuple[str, ...] = CNN) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--master-port",
        str(29500 + os.getpid() % 1000),
        str(ROOT / "cli.py"),
        "extract",
        "--data",
        str(manifest),
        "--out",
        str(out),
        *COMMON,
        *backbones,
    ]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _single(manifest: Path, out: Path, backbones: tuple[str, ...] = CNN) -> FeatureStore:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "extract",
            "--data",
            str(manifest),
            "--out",
            str(out),
            *COMMON,
            *backbones,
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr
    return FeatureStore(out)


def _same(a: FeatureStore, b: FeatureStore) -> None:
    assert a.samples().image_id == b.samples().image_id
    assert a.samples().sha256 == b.samples().sha256
    for backbone in a.backbones:
        np.testing.assert_allclose(a.embeddings(backbone), b.embeddings(backbone), atol=1e-5)
        assert a.done(backbone).all()
        assert a.backbone_attrs(backbone)["fingerprint"] == b.backbone_attrs(backbone)["fingerprint"]
    assert a.backbones == b.backbones


def _shard_lines(stderr: str) -> dict[int, tuple[int, int]]:
    found = re.findall(r"rank (\d)/2: (\d+) images in its shard, (\d+) embedded by this run", stderr)
    return {int(r): (int(n), int(e)) for r, n, e in found}


def test_two_processes_make_the_single_process_store(tmp_path):
    """With a timm ViT beside the CNN, each with options of its own: every rank builds both alike."""
    manifest = csv_data_set(tmp_path, 9)
    single = _single(manifest, tmp_path / "single.h5", BOTH)
    done = subprocess.run(_torchrun(manifest, tmp_path / "dist.h5", BOTH), capture_output=True, text=True, env=_env())
    assert done.returncode == 0, done.stderr
    _same(FeatureStore(tmp_path / "dist.h5"), single)
    assert single.backbones == sorted([TINY, VIT]) and single.dim(VIT) == 2 * 192
    assert _shard_lines(done.stderr) == {0: (5, 5), 1: (4, 4)}  # explicit, disjoint, no padding
    assert not (tmp_path / "dist.h5.shards").exists()
    # more images later: only the new ones are sharded and embedded, appended after the old rows
    more = csv_data_set(tmp_path, 4, name="more.csv", start=9)
    both = tmp_path / "both.csv"
    both.write_text(manifest.read_text() + "".join(more.read_text().splitlines(keepends=True)[1:]))
    again = subprocess.run(_torchrun(both, tmp_path / "dist.h5", BOTH), capture_output=True, text=True, env=_env())
    assert again.returncode == 0, again.stderr
    assert _shard_lines(again.stderr) == {0: (2, 2), 1: (2, 2)}
    _same(FeatureStore(tmp_path / "dist.h5"), _single(both, tmp_path / "single-both.h5", BOTH))


def test_a_killed_rank_is_resumed_by_rerunning_the_command(tmp_path):
    manifest = csv_data_set(tmp_path, 24)
    out = tmp_path / "dist.h5"
    proc = subprocess.Popen(
        _torchrun(manifest, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    journal = out.with_name("dist.h5.shards") / "rank-1-of-2.h5.partial"
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        if len(list(journal.glob("chunk-*.npz"))) >= 1:
            victim = _rank_pid(1)
        time.sleep(0.02)
    assert victim, "rank 1 never journalled a chunk"
    os.kill(victim, signal.SIGKILL)
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not out.exists()
    rerun = subprocess.run(_torchrun(manifest, out), capture_output=True, text=True, env=_env())
    assert rerun.returncode == 0, rerun.stderr
    lines = _shard_lines(rerun.stderr)
    assert lines[0][0] == lines[1][0] == 12
    assert lines[1][1] < 12, "rank 1 should resume from its journal"
    assert sum(e for _, e in lines.values()) < 24
    _same(FeatureStore(out), _single(manifest, tmp_path / "single.h5"))


def test_a_job_on_a_store_that_another_process_writes_is_refused_before_any_work(tmp_path):
    """Rank 0 takes the output store's lock before any rank plans (and holds it until the store is
    assembled, the shards gathered under it): with another writer on --out, the job stops at once."""
    manifest = csv_data_set(tmp_path, 4)
    out = tmp_path / "dist.h5"
    with StoreLock(out):  # held by this process: another writer, as far as the job can tell
        done = subprocess.run(_torchrun(manifest, out), capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode != 0
    assert f"{out} is being written by another extract (PID {os.getpid()}" in done.stderr
    assert not (tmp_path / "dist.h5.shards").exists() and not journal_folder(out).exists() and not out.exists()


def _rank_pid(rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank (the first such process: not its decoders)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"cli.py" in cmdline and b"torch.distributed.run" not in cmdline and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return min(found) if found else None


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find a rank's process")
