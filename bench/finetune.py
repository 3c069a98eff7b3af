"""The best frozen pipeline against end-to-end fine-tuning, on the same test rows.

EfficientNet-Lite0 (or `--backbone`: Lite1, Lite2; real ImageNet weights) on
../shared/data/ham10000_mel_nv_150: `fit` tunes the
linear, mlp and xgboost heads (20 trials each) on the frozen embeddings; `finetune --init` then starts
from the tuned linear head with `--unfreeze 1`, `2` and `all`, once per `--seeds` value (the seed of
the training's randomness; the split is the frozen runs'). All rows are scored on the store's test rows
(lesion-grouped, never trained or early-stopped on). Prints test balanced accuracy, AUC and wall time
per row, and per `--unfreeze` the mean and spread over the seeds of the gain over the best frozen head.

    python bench/finetune.py [--backbone efficientnet_lite2] [--unfreeze 1,2,all] [--seeds 0,1,2] [--work DIR]
                             [--reuse-frozen] [--set epochs=12 ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classify.finetune import FinetuneConfig, finetune  # noqa: E402
from classify.fit import FitConfig, fit  # noqa: E402
from extract.run import ExtractConfig, extract  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ham10000_mel_nv_150"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0", help="a backbone with real weights here")
    parser.add_argument("--unfreeze", default="1,2,all")
    parser.add_argument("--seeds", default="0", help="fine-tuning seeds, comma-separated (e.g. 0,1,2)")
    parser.add_argument("--heads", default="linear,mlp,xgboost")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--work", default=str(ROOT / "bench-work" / "finetune"))
    parser.add_argument(
        "--reuse-frozen",
        action="store_true",
        help="take the frozen rows from earlier runs in --work (same store and split) if present",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a finetune option for every fine-tuning row, e.g. --set epochs=12",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = work / f"ham-{args.backbone}.h5"
    extract(ExtractConfig(data=str(DATA / "labels.csv"), images=str(DATA), backbone=args.backbone, out=str(store)))
    rows = []
    for head in args.heads.split(","):
        run = work / f"frozen-{args.backbone}-{head}"
        if args.reuse_frozen and (run / "metrics.json").is_file():
            timing = run / "bench_seconds.txt"
            seconds = float(timing.read_text()) if timing.is_file() else float("nan")
            rows.append((f"frozen, {head} head", json.loads((run / "metrics.json").read_text())["test"], seconds, "-"))
            continue
        shutil.rmtree(run, ignore_errors=True)
        started = time.monotonic()
        metrics = fit(FitConfig(features=str(store), head=head, out=str(run), trials=args.trials))
        (run / "bench_seconds.txt").write_text(f"{time.monotonic() - started:.1f}")
        rows.append((f"frozen, {head} head", metrics["test"], time.monotonic() - started, "-"))
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in FinetuneConfig.__dataclass_fields__:
            parser.error(f"--set {key}: not a finetune option")
        for kind in (int, float, str):
            try:
                overrides[key] = kind(value)
                break
            except ValueError:
                continue
    frozen_best = max(rows, key=lambda r: r[1]["auc"])[1] if rows else None
    gains: dict[str, list[tuple[float, float]]] = {}
    for unfreeze in args.unfreeze.split(","):
        for seed in [int(v) for v in args.seeds.split(",")]:
            run = work / f"finetune-{args.backbone}-{unfreeze}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            started = time.monotonic()
            metrics = finetune(
                FinetuneConfig(
                    data=str(DATA / "labels.csv"),
                    images=str(DATA),
                    backbone=args.backbone,
                    init=str(work / f"frozen-{args.backbone}-linear"),
                    out=str(run),
                    unfreeze=unfreeze,
                    seed=seed,
                    **overrides,
                )
            )
            best = json.loads((run / "config.json").read_text())["best_epoch"]
            rows.append(
                (f"fine-tuned, --unfreeze {unfreeze}, seed {seed}", metrics["test"], time.monotonic() - started, best)
            )
            if frozen_best is not None:
                m = metrics["test"]
                gains.setdefault(unfreeze, []).append(
                    (m["auc"] - frozen_best["auc"], m["balanced_accuracy"] - frozen_best["balanced_accuracy"])
                )
    print()
    print("| pipeline | test balanced accuracy (95 % CI) | test AUC (95 % CI) | wall time | best epoch |")
    print("| --- | --- | --- | --- | --- |")
    for name, m, seconds, best in rows:
        ba, auc = m["balanced_accuracy"], m["auc"]
        (bl, bh), (al, ah) = m["ci95"]["balanced_accuracy"], m["ci95"]["auc"]
        ci = f"{ba:.3f} ({bl:.3f}-{bh:.3f}) | {auc:.3f} ({al:.3f}-{ah:.3f})"
        print(f"| {name} | {ci} | {seconds / 60:.1f} min | {best} |")
    if gains:
        print()
        print("| --unfreeze | seeds | AUC gain over the best frozen head: mean (min, max) | balanced accuracy gain |")
        print("| --- | --- | --- | --- |")
        for unfreeze, values in gains.items():
            auc, ba = np.array(values).T
            print(
                f"| {unfreeze} | {len(values)} | {auc.mean():+.3f} ({auc.min():+.3f}, {auc.max():+.3f}) | "
                f"{ba.mean():+.3f} ({ba.min():+.3f}, {ba.max():+.3f}) |"
            )


if __name__ == "__main__":
    main()
