"""Scale-out figures: torchrun extraction with 1 and 2 processes, and one study with 1, 2 and 4 workers.

1. Extraction of the first --images images of ../shared/data/ham10000_mel_nv_150 with --backbone
   (random-init weights unless efficientnet_lite0), by `cli.py extract` in one process and by
   `torchrun --nproc-per-node 2 cli.py extract`; wall time of each command and whether the two stores
   agree (rows, order, embeddings). On N GPUs the command is the same with --nproc-per-node N.
2. Trials per minute of one study on PostgreSQL (`--storage`, or $SKINLESION_TEST_POSTGRES as
   `.ci/postgres.sh` sets it) with 1, 2 and 4 `fit --no-report` workers, on a synthetic store.

    python bench/scale.py [--images 400] [--backbone resnet50] [--head mlp] [--trials 8]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT.parent / "shared" / "data" / "ham10000_mel_nv_150"


def extraction(work: Path, images: int, backbone: str) -> None:
    from features.store import FeatureStore

    rows = list(csv.DictReader(open(DATA / "labels.csv")))[:images]
    manifest = work / "subset.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    weights = "default" if backbone == "efficientnet_lite0" else "none"
    args = ["extract", "--data", str(manifest), "--images", str(DATA), "--backbone", backbone, "--weights", weights]
    timings = {}
    for name, launcher in (("1 process", [sys.executable, str(ROOT / "cli.py")]),
                           ("torchrun, 2 processes", [sys.executable, "-m", "torch.distributed.run",
                                                      "--nproc-per-node", "2", str(ROOT / "cli.py")])):  # fmt: skip
        out = work / f"{name.split()[0].strip(',')}.h5"
        started = time.monotonic()
        subprocess.run([*launcher, *args, "--out", str(out)], check=True, capture_output=True)
        timings[name] = (time.monotonic() - started, out)
    (t1, one), (t2, two) = timings.values()
    a, b = FeatureStore(one), FeatureStore(two)
    same = a.samples().image_id == b.samples().image_id
    diff = float(np.abs(a.embeddings(backbone) - b.embeddings(backbone)).max())
    print(f"\n| extraction of {images} images, {backbone} | wall time | images/s |\n| --- | --- | --- |")
    for name, (seconds, _) in timings.items():
        print(f"| {name} | {seconds:.1f} s | {images / seconds:.1f} |")
    print(f"\nsame rows in the same order: {same}; largest embedding difference {diff:.2e}")
    print("N GPUs: torchrun --nproc-per-node N cli.py extract ... (each rank takes cuda:LOCAL_RANK)")


def workers(work: Path, url: str, head: str, trials: int) -> None:
    import optuna
    import psycopg
    from conftest import synthetic_store

    store = synthetic_store(work / "syn.h5", n=2000, dim=64)
    print(f"\n| workers ({head} head, 2000 x 64 synthetic store, {trials} trials each) | trials | minutes |"
          " trials per minute |\n| --- | --- | --- | --- |")  # fmt: skip
    for n in (1, 2, 4):
        name = f"skinlesion_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        db = url.rsplit("/", 1)[0] + "/" + name
        command = [sys.executable, str(ROOT / "cli.py"), "fit", "--features", str(store), "--head", head,
                   "--storage", db, "--study", "bench", "--trials", str(trials), "--no-report"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        started = time.monotonic()
        procs = [subprocess.Popen([*command, "--out", str(work / f"w{n}-{k}")], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for k in range(n)]  # fmt: skip
        for p in procs:
            p.wait()
        minutes = (time.monotonic() - started) / 60
        done = len(optuna.load_study(study_name="bench", storage=db).get_trials(
            states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)))  # fmt: skip
        print(f"| {n} | {done} | {minutes:.2f} | {done / minutes:.1f} |", flush=True)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--head", default="mlp")
    parser.add_argument("--trials", type=int, default=8, help="trials per worker")
    parser.add_argument("--storage", default=os.environ.get("SKINLESION_TEST_POSTGRES"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    print(f"{os.cpu_count()} cores")
    extraction(work, args.images, args.backbone)
    if args.storage:
        workers(work, args.storage, args.head, args.trials)
    else:
        print("\nno PostgreSQL (--storage or SKINLESION_TEST_POSTGRES; `source .ci/postgres.sh`): workers skipped")


if __name__ == "__main__":
    main()
