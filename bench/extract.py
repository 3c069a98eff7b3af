"""Extraction speed against the naive loop and against this machine's matrix-product ceiling.

For each backbone, on the same images, in fresh processes (so each peak memory is its own):

- the naive loop: PIL decode and torchvision transforms per image in the main process, fp32, NCHW,
  batch 32, `torch.no_grad`, no workers;
- `cli.py extract` as a user runs it (every option at its default: --runtime auto, --precision auto,
  decoding workers, the per-device batch size), timed from the call to the finished store, and in
  steady state (the second half of the images): its first run on this machine, which converts or
  compiles the model and caches it, and a later run, which reads it from the cache;
- the torch runtime (`--runtime torch`): eager (the default for a first run of under 2000 images) and
  compiled ahead of time, from the cache (`--compile on` fills it first);
- OpenVINO int8 (`--precision int8`), first run (calibrating on 300 images) and later runs.

The cache is a folder of the benchmark's own, emptied at the start. The ceiling is a 4096^3 matrix
product in bf16 (`torch.matmul`, best of 5), measured again before each backbone's row, since on this
shared machine it moves by 10-30 % from minute to minute; a backbone's cost per image is counted by
`torch.utils.flop_counter` (2 FLOPs per multiply-add). The second table (`--heads`) fits the linear,
mlp and xgboost heads on fp32, bf16, OpenVINO bf16 and int8 embeddings of ham10000_mel_nv_150
(EfficientNet-Lite0, real weights) and compares their test scores; `--embeddings` picks other stores
of EMBEDDINGS, e.g. fp32 decoded by Pillow and by torch (`extract --decode`, bench/decode.py).

    python bench/extract.py [--backbones resnet50,vgg11,...] [--images 960] [--heads] [--trials 10]
    python bench/extract.py --backbones timm:vit_small_patch14_dinov2.lvd142m@224,timm:convnext_tiny

A backbone written NAME@N runs at `--input-size N`. Speed does not depend on the weights' values: every
backbone but EfficientNet-Lite runs with --weights none. A run that fails (a model that a runtime cannot
take) is printed as failed with its reason; the other columns are still measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/extract.py must not shadow the package
from common import DATA, IN_MEMORY, first_images  # noqa: E402

BACKBONES = "resnet50,vgg11,densenet121,inception_v3,efficientnet_lite0"


def matmul_ceiling(n: int = 4096) -> dict[str, float]:
    """GFLOP/s of an n^3 matrix product in fp32 and bf16 on this machine (best of 5)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
        out[name] = 2 * n**3 / best / 1e9
    return out


def parse(spec: str) -> tuple[str, int]:
    """(backbone name, input size; 0 for the weights' own) of a --backbones entry NAME or NAME@N."""
    name, _, size = spec.partition("@")
    return name, int(size or 0)


def weights(name: str) -> str:
    """Real weights where they are on this machine (EfficientNet-Lite), random ones elsewhere."""
    return "default" if name.startswith("efficientnet_lite") else "none"


def load(spec: str):
    from extract.backbones import BackboneOptions, load_backbone

    name, size = parse(spec)
    return load_backbone(name, weights(name), BackboneOptions(input_size=size))


def gflop_per_image(spec: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    backbone = load(spec)
    size = backbone.preprocess.crop
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone.module(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def naive(name: str, csv_path: Path) -> dict:
    """The loop everyone writes first: per-image PIL decode and transforms, fp32, NCHW, batch 32."""
    import torch
    from PIL import Image
    from torchvision import transforms

    torch.set_num_threads(os.cpu_count() or 1)
    backbone = load(name)
    p = backbone.preprocess
    transform = transforms.Compose(
        [
            transforms.Resize(p.resize, interpolation=transforms.InterpolationMode(p.interpolation)),
            transforms.CenterCrop(p.crop),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in p.mean], [s / 255 for s in p.std]),
        ]
    )
    files = [DATA / row["path"] for row in csv.DictReader(open(csv_path))]
    model = backbone.module.eval()
    started = time.monotonic()
    first = None
    with torch.no_grad():
        for start in range(0, len(files), 32):
            batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start : start + 32]])
            model(batch)
            if first is None:
                first = time.monotonic()
    end = time.monotonic()
    return {"images_per_s": len(files) / (end - started), "steady_images_per_s": (len(files) - 32) / (end - first)}


def tool(
    name: str,
    csv_path: Path,
    out: Path,
    precision: str = "auto",
    compile: str = "auto",
    runtime: str = "auto",
    decode: str = "auto",
) -> dict:
    """`cli.py extract` with its defaults (or the given options), timed from the call to the finished
    store."""
    from extract.run import ExtractConfig, extract

    name, size = parse(name)
    started = time.monotonic()
    summary = extract(
        ExtractConfig(
            data=str(csv_path),
            images=str(DATA),
            backbone=name,
            out=str(out),
            weights=weights(name),
            input_size=size,
            precision=precision,
            compile=compile,
            runtime=runtime,
            decode=decode,
        )
    )
    seconds = time.monotonic() - started
    n = summary.embedded[name]
    config = json.loads(_attrs(out))
    return {
        "images_per_s": n / seconds,
        "steady_images_per_s": summary.steady_images_per_s,
        "precision": config["precision"],
        "runtime": config["runtime"],
    }


def _attrs(store: Path) -> str:
    import h5py

    with h5py.File(store, "r") as f:
        return f.attrs["extract_config"]


def one(args: argparse.Namespace) -> None:
    """A single measurement in this (fresh) process; prints one JSON line."""
    csv_path, name = Path(args.csv), args.one
    if args.mode == "naive":
        result = naive(name, csv_path)
    else:
        result = tool(name, csv_path, Path(args.store), **MODES[args.mode])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_rss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(result))


MODES = {
    "first": {},  # the defaults, cache empty
    "later": {},  # the defaults again, cache filled by "first"
    "int8-first": {"precision": "int8"},  # OpenVINO int8: calibrates on the first 300 images, caches it
    "int8": {"precision": "int8"},  # and reads it from the cache
    "eager": {"runtime": "torch"},  # < 2000 images and nothing cached: eager
    "fill": {"runtime": "torch", "compile": "on"},
    "compiled": {"runtime": "torch"},  # after "fill": the cached package, loaded by `auto`
}
"""Runs of `cli.py extract` per backbone, in this order: the options each passes."""


def measure(name: str, mode: str, csv_path: Path, work: Path) -> dict:
    """One measurement in a fresh process; {"failed": reason} when the run fails."""
    store = work / f"{name.replace('/', '_').replace(':', '_')}-{mode}.h5"
    store.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--one", name, "--mode", mode, "--csv", str(csv_path), "--store", str(store)]
    env = {**os.environ, "SKINLESION_CACHE": str(work / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"failed": lines[-1][:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


SEEDS = 5


def heads_table(work: Path, trials: int, labels: list[str]) -> None:
    """Test scores of each head on fp32 and on bf16 embeddings (torch's, and OpenVINO's) of the same
    images and split: tuned by its own study on each store, and with the same parameters (the fp32
    study's best) on all, which
    separates the embeddings' precision from the noise of tuning; those are the mean over SEEDS seeds of
    the head's own randomness (XGBoost's column and row sampling, the MLP's initialisation and batches),
    which a single seed turns into differences of a point or more."""
    import logging

    import numpy as np

    from classify.fit import FitConfig, fit

    logging.disable(logging.INFO)
    embeddings = {label: EMBEDDINGS[label] for label in labels}
    stores = {}
    for label, options in embeddings.items():
        stores[label] = work / f"ham-lite0-{label.replace(' ', '-')}.h5"
        if not stores[label].exists():
            tool("efficientnet_lite0", DATA / "labels.csv", stores[label], **options)
    others = [label for label in embeddings if label != "fp32"]
    print(
        "\n| head | "
        + " | ".join(f"{label}: test BA / AUC" for label in embeddings)
        + "".join(f" | AUC, {label} - fp32" for label in others)
        + f" | same parameters, mean of {SEEDS} seeds: "
        + " | ".join(f"{label}: BA / AUC (sd)" for label in embeddings)
        + "".join(f" | AUC, {label} - fp32" for label in others)
        + " |"
    )
    print("|" + " --- |" * (1 + 2 * (len(embeddings) + len(others))))
    for head in ("linear", "mlp", "xgboost"):
        tuned, same = {}, {}
        for label, store in stores.items():
            run = work / f"run-{head}-{label.replace(' ', '-')}"
            metrics = run / "metrics.json"
            if not metrics.is_file():  # a rerun reuses the studies
                fit(FitConfig(features=str(store), head=head, out=str(run), trials=trials))
            tuned[label] = json.loads(metrics.read_text())["test"]
        params = json.loads((work / f"run-{head}-fp32" / "config.json").read_text())["params"]
        for label, store in stores.items():
            data = study_and_test(store)
            runs = [fixed_params_test(data, head, {**params, "random_state": seed}) for seed in range(SEEDS)]
            same[label] = {k: float(np.mean([r[k] for r in runs])) for k in ("balanced_accuracy", "auc")}
            same[label]["sd"] = float(np.std([r["auc"] for r in runs]))
        cells = [f"{tuned[k]['balanced_accuracy']:.3f} / {tuned[k]['auc']:.3f}" for k in embeddings]
        cells += [f"{tuned[k]['auc'] - tuned['fp32']['auc']:+.3f}" for k in others]
        cells += [
            f"{same[k]['balanced_accuracy']:.3f} / {same[k]['auc']:.3f} ({same[k]['sd']:.3f})" for k in embeddings
        ]
        cells += [f"{same[k]['auc'] - same['fp32']['auc']:+.3f}" for k in others]
        print(f"| {head} | {' | '.join(cells)} |", flush=True)


EMBEDDINGS = {
    "fp32": {"precision": "fp32", "runtime": "torch", "decode": "pil"},
    "bf16": {"precision": "bf16", "runtime": "torch", "decode": "pil"},
    "openvino bf16": {"precision": "bf16", "runtime": "openvino", "decode": "pil"},
    "openvino int8": {"precision": "int8", "runtime": "openvino", "decode": "pil"},
    "torch decode": {"precision": "fp32", "runtime": "torch", "decode": "torch"},
}
"""The stores the heads table compares, by label: the options `cli.py extract` makes each with (Pillow
decoding for all but the last, as when the table was first measured, before --decode)."""


def study_and_test(store_path: Path):
    """The store's rows as `fit` loads them (the default split)."""
    from classify.fit import load_data
    from classify.inputs import InputSpec
    from features.splits import SplitSpec, split_for
    from features.store import FeatureStore

    store = FeatureStore(store_path)
    return load_data(store, InputSpec(("efficientnet_lite0",)), split_for(store, SplitSpec()), IN_MEMORY)


def fixed_params_test(data, head: str, params: dict) -> dict:
    """The head with these parameters fitted on the study rows and scored on the test rows."""
    from classify.heads import get_head
    from classify.inputs import fit_views, proba_views
    from classify.metrics import evaluate

    model = get_head(head)(**params)
    fit_views(model, data.x[data.study], data.y[data.study], data.groups[data.study])
    proba = proba_views(model, data.x[data.test])
    return evaluate(data.y[data.test], proba, list(model.classes_), data.groups[data.test], "mel", "nv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--heads", action="store_true", help="also the fp32 against bf16 heads table")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument(
        "--embeddings",
        default="fp32,bf16,openvino bf16,openvino int8",
        help=f"the heads table's stores, comma-separated, fp32 first (of: {', '.join(EMBEDDINGS)})",
    )
    parser.add_argument("--work", default=None, help="folder for stores and runs (default: a temporary one)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--csv", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return one(args)
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    ceiling = matmul_ceiling()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores; matrix product 4096^3: "
        f"{ceiling['fp32']:.0f} GFLOP/s fp32, {ceiling['bf16']:.0f} GFLOP/s bf16; {args.images} images"
    )
    print(
        "\n| backbone | GFLOP/image | bf16 ceiling, GFLOP/s | naive loop, images/s | `cli.py extract` defaults,"
        " first run: images/s (steady) | later runs | speed-up (later / naive) | share of the ceiling, later"
        " runs (steady) | `--precision int8` (OpenVINO), first run | later runs | `--runtime torch`: eager |"
        " torch compiled (cached) | its share (steady) |"
        " peak memory: naive / defaults / torch compiled |"
    )
    print("|" + " --- |" * 14)
    csv_path = first_images(args.images, work)
    for name in filter(None, args.backbones.split(",")):  # --backbones '' runs only the heads table
        gflop = gflop_per_image(name)
        limit = matmul_ceiling()["bf16"]
        slow = measure(name, "naive", csv_path, work)
        m = {mode: measure(name, mode, csv_path, work) for mode in MODES}

        def speed(r: dict) -> str:
            if "failed" in r:
                return f"failed: {r['failed']}"
            return f"{r['images_per_s']:.1f} ({r['steady_images_per_s']:.1f})"

        def share(r: dict) -> str:
            if "failed" in r:
                return "-"
            return f"{r['images_per_s'] * gflop / limit:.0%} ({r['steady_images_per_s'] * gflop / limit:.0%})"

        def peak(r: dict) -> str:
            if "failed" in r:
                return "-"
            return f"{max(r['peak_rss_mb'], r['peak_rss_children_mb']):.0f}"

        later = m["later"]
        gain = f"{later['images_per_s'] / slow['images_per_s']:.1f}x" if "failed" not in later else "-"
        chosen = f" ({later['runtime']}, {later['precision']})" if "failed" not in later else ""
        print(
            f"| {name} | {gflop:.2f} | {limit:.0f} | {slow['images_per_s']:.1f} | {speed(m['first'])} | "
            f"{speed(later)}{chosen} | "
            f"{gain} | {share(later)} | {speed(m['int8-first'])} | "
            f"{speed(m['int8'])} | {speed(m['eager'])} | "
            f"{speed(m['compiled'])} | {share(m['compiled'])} | "
            f"{peak(slow)} / {peak(later)} / {peak(m['compiled'])} MB |",
            flush=True,
        )
    if args.heads:
        heads_table(work, args.trials, args.embeddings.split(","))


if __name__ == "__main__":
    main()
