"""Scale-out figures: torchrun extraction with 1 and 2 processes, one study with 1, 2 and 4 workers, and a
store larger than memory (a fit, and the duplicate audit).

1. Extraction of the first --images images of ../shared/data/ham10000_mel_nv_150 with --backbone
   (random-init weights unless efficientnet_lite0), by `cli.py extract` in one process and by
   `torchrun --nproc-per-node 2 cli.py extract`; wall time of each command and whether the two stores
   agree (rows, order, embeddings). On N GPUs the command is the same with --nproc-per-node N.
2. Trials per minute of one study on PostgreSQL (`--storage`, or $SKINLESION_TEST_POSTGRES as
   `.ci/postgres.sh` sets it) with 1, 2 and 4 `fit --no-report` workers, on a synthetic store.
3. A store larger than memory: wall time and peak resident memory of
   `cli.py fit --head xgboost --trials 2 --memory-budget 1GB` on a synthetic store of --rows x --dim
   float16 embeddings (1,000,000 x 1,024: 2 GB), written first if --large-store does not exist.
4. `cli.py audit` of that store: every pair of its rows compared (N^2/2), wall time and peak memory.

    python bench/scale.py [--parts extraction,workers,large,audit] [--images 400] [--backbone resnet50]
                          [--head mlp] [--trials 8] [--large-store FILE --rows 1000000 --dim 1024]
    python bench/scale.py --synthetic-store FILE --rows N --dim D    # only write such a store

The synthetic store is in the real format: two classes (mel 20 %, nv 80 %), lesion groups of 1 to 4
images, embeddings with the low-rank structure of real ones (`--structure factors`, see
`synthetic_store`) or independent dimensions (`isotropic`, the hard case for trees), written block by
block so that it never has to fit in memory.
"""

from __future__ import annotations

import argparse
import csv
import json
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
    for name, launcher in (
        ("1 process", [sys.executable, str(ROOT / "cli.py")]),
        (
            "torchrun, 2 processes",
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(ROOT / "cli.py")],
        ),
    ):
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
    print(
        f"\n| workers ({head} head, 2000 x 64 synthetic store, {trials} trials each) | trials | minutes |"
        " trials per minute |\n| --- | --- | --- | --- |"
    )
    for n in (1, 2, 4):
        name = f"skinlesion_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        db = url.rsplit("/", 1)[0] + "/" + name
        command = [
            sys.executable,
            str(ROOT / "cli.py"),
            "fit",
            "--features",
            str(store),
            "--head",
            head,
            "--storage",
            db,
            "--study",
            "bench",
            "--trials",
            str(trials),
            "--no-report",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        started = time.monotonic()
        procs = [
            subprocess.Popen(
                [*command, "--out", str(work / f"w{n}-{k}")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for k in range(n)
        ]
        for p in procs:
            p.wait()
        minutes = (time.monotonic() - started) / 60
        done = len(
            optuna.load_study(study_name="bench", storage=db).get_trials(
                states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            )
        )
        print(f"| {n} | {done} | {minutes:.2f} | {done / minutes:.1f} |", flush=True)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


SYNTHETIC_BLOCK = 65536
"""Rows generated and journalled at a time by `synthetic_store`."""


STRUCTURES = ("factors", "isotropic")
FACTORS = 32


def synthetic_store(path: Path, rows: int, dim: int, seed: int = 0, structure: str = "factors") -> Path:
    """A float16 feature store of `rows` x `dim` random embeddings with class and lesion structure,
    written block by block (see the module's docstring).

    `factors` (the default) imitates real embeddings, measured on EfficientNet-Lite0's of
    ham10000_mel_nv_150: 70 % of their variance lies in 32 principal components and 97 % of the gap
    between the class means in the top 8. So: 32 latent factors of decaying variance, loaded on every
    dimension; the classes apart along the first 8 (Mahalanobis distance 1.8: a linear AUC near 0.87);
    a lesion offset shared by a lesion's images; independent noise holding 30 % of the variance.
    `isotropic` is the hard case for trees: independent dimensions, the class gap spread over all of
    them with weights 1/sqrt(rank), so boosting must add up a thousand weak features."""
    from features.store import Samples, write_blocks

    if structure not in STRUCTURES:
        raise SystemExit(f"--structure {structure!r}: choose {', '.join(STRUCTURES)}")
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 2, 3, 4], size=rows, p=[0.75, 0.15, 0.07, 0.03])
    group_of = np.repeat(np.arange(rows), sizes)[:rows]  # lesion k covers sizes[k] consecutive rows
    labels = np.where(rng.random(group_of[-1] + 1) < 0.2, "mel", "nv")[group_of]
    if structure == "factors":
        spread = (1 / np.sqrt(np.arange(1, FACTORS + 1))).astype(np.float32)
        loadings = rng.standard_normal((FACTORS, dim)).astype(np.float32)
        gap = np.where(np.arange(FACTORS) < 8, spread, 0).astype(np.float32)
        gap *= 1.8 / np.sqrt(8)  # Mahalanobis distance sqrt(sum((gap / spread)^2)) = 1.8
        noise = float(np.sqrt(np.sum(spread**2) * 0.3 / 0.7))
    else:
        spread = np.ones(dim, dtype=np.float32)
        strength = 1 / np.sqrt(np.arange(1, dim + 1))  # a few strong dimensions, a long weak tail
        gap = (rng.normal(size=dim) * strength).astype(np.float32)
        gap *= 2.5 / np.linalg.norm(gap)
    samples = Samples(
        image_id=[f"syn{r:07d}" for r in range(rows)],
        path=[f"synthetic/syn{r:07d}.jpg" for r in range(rows)],
        label=labels.tolist(),
        group=[f"lesion{g:07d}" for g in group_of],
        sha256=[""] * rows,
    )
    attrs = {
        "fingerprint": f"synthetic-{structure}-{rows}x{dim}-seed{seed}",
        "identity": "{}",
        "weights": "none",
        "weights_sha256": "",
        "precision": "fp16",
        "views": "none",
        "dim": dim,
    }

    def blocks():
        for start in range(0, rows, SYNTHETIC_BLOCK):
            stop = min(rows, start + SYNTHETIC_BLOCK)
            local = np.random.default_rng([seed, start])
            groups = group_of[start:stop] - group_of[start]
            lesion = local.standard_normal((groups[-1] + 1, len(spread)), dtype=np.float32) * 0.5 * spread
            z = local.standard_normal((stop - start, len(spread)), dtype=np.float32) * spread + lesion[groups]
            z += np.where(labels[start:stop] == "mel", 0.5, -0.5).astype(np.float32)[:, None] * gap
            if structure == "factors":
                z = z @ loadings + noise * local.standard_normal((stop - start, dim), dtype=np.float32)
            yield start, {"synthetic": z.astype(np.float16)}

    write_blocks(path, samples, {"synthetic": attrs}, blocks())
    return path


def ensure_store(store: Path, rows: int, dim: int, structure: str) -> None:
    """Write the synthetic store unless it exists, in a process of its own (a child forked from a big
    parent inherits its peak)."""
    if not store.is_file():
        started = time.monotonic()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--synthetic-store",
                str(store),
                "--rows",
                str(rows),
                "--dim",
                str(dim),
                "--structure",
                structure,
            ],
            check=True,
        )
        print(f"wrote it in {time.monotonic() - started:.0f} s")


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """Run `command` with its output in `log`: wall seconds and the child's own peak resident GiB."""
    started = time.monotonic()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak resident memory (ru_maxrss)
    if status != 0:
        raise SystemExit(f"{command[2]} failed (status {status}); see {log}")
    return time.monotonic() - started, usage.ru_maxrss / 2**20


def large(store: Path, rows: int, dim: int, budget: str, structure: str) -> None:
    """`fit --head xgboost --trials 2` on a store larger than the budget: wall time, peak RSS."""
    ensure_store(store, rows, dim, structure)
    out = store.with_name(store.stem + "-xgboost-run")
    command = [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--features",
        str(store),
        "--head",
        "xgboost",
        "--trials",
        "2",
        "--memory-budget",
        budget,
        "--out",
        str(out),
    ]
    log = out.with_suffix(".log")
    seconds, peak = timed(command, log)
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"\n| fit --head xgboost --trials 2, {store.name}, --memory-budget {budget} "
        "| wall time | peak resident memory | test AUC |\n| --- | --- | --- | --- |"
    )
    print(
        f"| {store.stat().st_size / 2**30:.2f} GiB store | {seconds / 60:.1f} min | "
        f"{peak:.2f} GiB | {metrics['test']['auc']:.3f} |"
    )
    print(f"command: {' '.join(command[1:])}\nlog: {log}")


def audit(store: Path, rows: int, dim: int, structure: str) -> None:
    """`audit` of the whole store (every pair of rows): wall time, peak RSS, the screen and the pairs."""
    from features.duplicates import fastest_screen

    ensure_store(store, rows, dim, structure)
    out = store.with_name(store.stem + "-audit")
    command = [sys.executable, str(ROOT / "cli.py"), "audit", "--features", str(store), "--out", str(out)]
    log = out.with_suffix(".log")
    seconds, peak = timed(command, log)
    pairs = sum(1 for _ in open(out / "pairs.csv")) - 1
    screen = fastest_screen()
    print(
        f"\n| audit, {store.name} | screen | wall time | peak resident memory | pairs >= 0.95 |\n"
        f"| --- | --- | --- | --- | --- |\n| {store.stat().st_size / 2**30:.2f} GiB store | {screen.dtype_name} on "
        f"{screen.device} | {seconds / 60:.1f} min | {peak:.2f} GiB | {pairs} |"
    )
    print(f"command: {' '.join(command[1:])}\nlog: {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default="extraction,workers,large,audit", help="which of extraction,workers,large,audit to run"
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--head", default="mlp")
    parser.add_argument("--trials", type=int, default=8, help="trials per worker")
    parser.add_argument("--storage", default=os.environ.get("SKINLESION_TEST_POSTGRES"))
    parser.add_argument("--synthetic-store", type=Path, help="only write a synthetic store of --rows x --dim here")
    parser.add_argument("--large-store", type=Path, help="the large part's store (default: in a temporary folder)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--budget", default="1GB", help="--memory-budget of the large part's fit")
    parser.add_argument("--structure", default="factors", choices=STRUCTURES, help="of the synthetic embeddings")
    args = parser.parse_args()
    if args.synthetic_store:
        started = time.monotonic()
        synthetic_store(args.synthetic_store, args.rows, args.dim, structure=args.structure)
        size = args.synthetic_store.stat().st_size / 2**30
        print(
            f"wrote {args.synthetic_store}: {args.rows} x {args.dim} float16 ({args.structure}), {size:.2f} GiB, "
            f"{time.monotonic() - started:.0f} s"
        )
        return
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    parts = set(args.parts.split(","))
    print(f"{os.cpu_count()} cores")
    if "extraction" in parts:
        extraction(work, args.images, args.backbone)
    if "workers" in parts and args.storage:
        workers(work, args.storage, args.head, args.trials)
    elif "workers" in parts:
        print("\nno PostgreSQL (--storage or SKINLESION_TEST_POSTGRES; `source .ci/postgres.sh`): workers skipped")
    store = args.large_store or work / f"synthetic-{args.structure}.h5"
    if "large" in parts:
        large(store, args.rows, args.dim, args.budget, args.structure)
    if "audit" in parts:
        audit(store, args.rows, args.dim, args.structure)


if __name__ == "__main__":
    main()
