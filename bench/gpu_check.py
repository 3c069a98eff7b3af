"""The GPU path, checked in a few minutes on a machine with an NVIDIA GPU (run by bench/gpu_check.sh).

What it measures, in this order (the most important first, so a run cut short still says something):

1. the card's matrix-product ceilings (8192^3; fp32 with TF32 off, TF32, bf16, fp16);
2. decoding: PIL decode + resize + crop per CPU core, the DataLoader of `extract` with several worker
   counts (no model: the most `extract` can reach), and nvJPEG (torchvision's GPU decoder) for scale;
3. per backbone: `extract` as a user runs it with `--device cuda` (every other option at its default,
   then with --precision fp32 and fp16), the naive loop on the GPU (per-batch PIL decode in the main
   process, fp32, NCHW, batch 32), the model alone on random pixels already on the GPU (fp32, bf16,
   fp16 at batch 64 and 256: the GPU's own limit), and agreement of GPU with CPU embeddings (relative
   error of GPU fp32 and GPU bf16 against CPU fp32 on the same images and weights);
4. if time is left: worker counts, batch size and --compile for resnet50's `extract`.

Images: the given folder's JPEGs (default: ../shared/data/isic_cc0_200, 600 px, CC0) repeated under new
ids. Weights: one random init per backbone saved to a file, the same on both devices (speed does not
depend on the weights' values). Results go to --out as JSON after every step, and as markdown tables
at the end.

    python bench/gpu_check.py [--backbones ...] [--images 4096] [--out DIR] [--device cpu (a dry run)]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.backbones import load_backbone  # noqa: E402
from extract.dataset import EachPreprocess, ImageDataset, collate_images  # noqa: E402
from extract.images import load_image  # noqa: E402
from extract.runtimes import PixelModel  # noqa: E402
from extract.run import ExtractConfig, cuda_settings, extract  # noqa: E402
from features.store import FeatureStore  # noqa: E402

BACKBONES = "resnet50,efficientnet_lite0,densenet121,inception_v3,vgg11"
DEFAULT_IMAGES = [ROOT.parent / "shared" / "data" / "isic_cc0_200" / "images", ROOT / "samples" / "isic_cc0" / "images"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("ceilings", "decode", "extract", "naive", "model", "agreement", "extras")
RESULTS: dict = {}


class Check:
    """Where the results go, and the time budget that decides whether the extras run."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.started = out, budget_s, time.monotonic()

    def save(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def step(self, label: str, fn: Callable, *args, **kwargs):
        """Run one measurement; an error is recorded and printed, and the check goes on."""
        started = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # one failing part must not lose the others' figures
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        print(
            f"[{time.monotonic() - self.started:6.1f} s] {label} ({time.monotonic() - started:.1f} s): "
            f"{json.dumps(result, default=str)[:300]}",
            flush=True,
        )
        self.save()
        return result


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def manifest(files: list[Path], n: int, folder: Path, tag: str) -> Path:
    path = folder / f"{tag}{n}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "path"])
        for i in range(n):
            writer.writerow([f"{tag}{i:06d}", str(files[i % len(files)])])
    return path


# ----------------------------------------------------------------------------------------- ceilings
def ceilings(device: str, n: int) -> dict:
    """TFLOP/s of an n^3 matrix product (median of 10 after 3 warm-ups), per precision."""
    out = {}
    matmul = torch.backends.cuda.matmul
    for label, dtype, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
        ("fp16", torch.float16, False),
    ):
        saved = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
            times = []
            for i in range(13):
                sync(device)
                started = time.perf_counter()
                torch.matmul(a, b)
                sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - started)
            out[label] = 2 * n**3 / float(np.median(times)) / 1e12
        finally:
            matmul.allow_tf32 = saved
    return out


# ----------------------------------------------------------------------------------------- decoding
def decode_one_core(files: list[Path], n: int) -> dict:
    """load_image + resnet50's resize/crop in this process: images per second per core."""
    pre = load_backbone("resnet50", "none").preprocess
    started = time.perf_counter()
    for i in range(n):
        img, _ = load_image(files[i % len(files)])
        pre.to_uint8(img)
    return {"images_per_s": n / (time.perf_counter() - started)}


def decode_loader(files: list[Path], n: int, workers: int, batch: int, device: str) -> dict:
    """`extract`'s own DataLoader (decode, resize, crop, collate, pin) with no model: its ceiling."""
    from torch.utils.data import DataLoader

    pre = load_backbone("resnet50", "none").preprocess
    loader = DataLoader(
        ImageDataset([files[i % len(files)] for i in range(n)], EachPreprocess([pre])),
        batch_size=batch,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=device == "cuda",
    )
    started, first, seen = time.perf_counter(), None, 0
    for positions, _, tensors, _ in loader:
        tensors[0].to(device, non_blocking=True)
        if first is None:
            first = time.perf_counter()
        else:
            seen += len(positions)
    sync(device)
    end = time.perf_counter()
    return {"images_per_s": n / (end - started), "steady_images_per_s": seen / (end - first)}


def decode_nvjpeg(files: list[Path], n: int) -> dict:
    """torchvision's GPU decoder on n files (batched), then resize/crop on the GPU, for scale."""
    import torchvision.transforms.v2.functional as F
    from torchvision.io import decode_jpeg, read_file

    datas = [read_file(str(files[i % len(files)])) for i in range(n)]
    decode_jpeg(datas[:16], device="cuda")
    torch.cuda.synchronize()
    started = time.perf_counter()
    images = decode_jpeg(datas, device="cuda")
    torch.cuda.synchronize()
    decoded = time.perf_counter()
    batch = torch.stack([F.center_crop(F.resize(img, [256], antialias=True), [224, 224]) for img in images])
    torch.cuda.synchronize()
    end = time.perf_counter()
    return {
        "decode_images_per_s": n / (decoded - started),
        "decode_resize_images_per_s": n / (end - started),
        "shape": list(batch.shape),
    }


# ----------------------------------------------------------------------------------------- per backbone
def run_extract(name: str, weights: Path, rows: Path, out: Path, device: str, **options) -> dict:
    """`extract` as a user runs it (options not given keep their defaults), timed from the call."""
    out.unlink(missing_ok=True)
    cfg = ExtractConfig(data=str(rows), backbone=name, weights=str(weights), out=str(out), device=device, **options)
    started = time.monotonic()
    summary = extract(cfg)
    seconds = time.monotonic() - started
    resolved = cfg.resolved()
    return {
        "images_per_s": summary.embedded[name] / seconds,
        "steady_images_per_s": summary.steady_images_per_s,
        "seconds": seconds,
        "precision": resolved.precision,
        "batch_size": resolved.batch_size,
        "workers": resolved.workers,
        "compile": cfg.compile,
        "failed": len(summary.failed),
    }


def model_only(name: str, device: str, precision: str, batch: int, iters: int) -> dict:
    """The backbone alone (normalisation included, channels-last, inference_mode) on random uint8
    pixels already on the device: what the GPU does when decoding costs nothing."""
    backbone = load_backbone(name, "none")
    backbone.module.to(device, memory_format=torch.channels_last).eval()
    size = backbone.preprocess.crop
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    forward = PixelModel(backbone, precision)
    times = []
    with torch.inference_mode(), cuda_settings(torch.device(device), precision):
        for i in range(iters + 3):
            sync(device)
            started = time.perf_counter()
            forward(x).float().sum().item()
            if i >= 3:
                times.append(time.perf_counter() - started)
    return {"images_per_s": batch / float(np.median(times))}


def naive(name: str, device: str, files: list[Path], n: int) -> dict:
    """The loop everyone writes first: per-image PIL decode and transforms in the main process, fp32,
    NCHW, batch 32, `torch.no_grad`, then to the GPU."""
    from PIL import Image
    from torchvision import transforms

    backbone = load_backbone(name, "none")
    p = backbone.preprocess
    transform = transforms.Compose(
        [
            transforms.Resize(p.resize),
            transforms.CenterCrop(p.crop),
            transforms.ToTensor(),
            transforms.Normalize([m / 255 for m in p.mean], [s / 255 for s in p.std]),
        ]
    )
    model = backbone.module.to(device).eval()
    started, first = time.monotonic(), None
    with torch.no_grad():
        for start in range(0, n, 32):
            batch = torch.stack(
                [transform(Image.open(files[i % len(files)]).convert("RGB")) for i in range(start, min(n, start + 32))]
            )
            model(batch.to(device)).cpu()
            if first is None:
                first = time.monotonic()
    end = time.monotonic()
    return {"images_per_s": n / (end - started), "steady_images_per_s": (n - 32) / (end - first)}


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image |a - b| / |b| (sharper than cosine similarity for random-init networks, whose
    embeddings all point much the same way)."""
    return np.linalg.norm(a - b, axis=1) / (np.linalg.norm(b, axis=1) + 1e-12)


def agreement(name: str, weights: Path, rows: Path, work: Path, device: str) -> dict:
    embeddings = {}
    for label, dev, precision in (("cpu", "cpu", "fp32"), ("fp32", device, "fp32"), ("bf16", device, "bf16")):
        store = work / f"{name}-agree-{label}.h5"
        run_extract(name, weights, rows, store, dev, precision=precision)
        embeddings[label] = FeatureStore(store).embeddings(name)
    out = {}
    for label in ("fp32", "bf16"):
        e = relative_error(embeddings[label], embeddings["cpu"])
        out[label] = {"mean": float(e.mean()), "max": float(e.max())}
    return out


def gflop_per_image(name: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    backbone = load_backbone(name, "none")
    size = backbone.preprocess.crop
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone.module.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------------------- tables
def _fmt(result: dict | None, key: str = "images_per_s") -> str:
    if not isinstance(result, dict) or key not in result:
        return "error" if isinstance(result, dict) and "error" in result else "-"
    return f"{result[key]:.0f}"


def _pair(result: dict | None) -> str:
    """'overall (steady)' images/s."""
    return f"{_fmt(result)} ({_fmt(result, 'steady_images_per_s')})"


def tables() -> str:
    lines = [
        f"{RESULTS['card']}; torch {RESULTS['torch']}, torchvision {RESULTS['torchvision']}; "
        f"{RESULTS['cpus']} CPU cores; {RESULTS['images']} images from {RESULTS['image_folder']}",
        "",
    ]
    c = RESULTS.get("ceilings", {})
    if "error" not in c:
        lines += [
            "| matrix product 8192^3, TFLOP/s | fp32 | tf32 | bf16 | fp16 |",
            "| --- | --- | --- | --- | --- |",
            "| measured | " + " | ".join(f"{c.get(k, 0):.0f}" for k in ("fp32", "tf32", "bf16", "fp16")) + " |",
            "",
        ]
    d = RESULTS.get("decode", {})
    lines += [
        "| decoding (resnet50's resize/crop), images/s | overall (steady) |",
        "| --- | --- |",
        f"| one CPU core, PIL | {_fmt(d.get('one_core'))} |",
    ]
    for key, value in d.items():
        if key.startswith("loader"):
            lines.append(f"| extract's DataLoader, {key.split('-')[1]} workers, no model | {_pair(value)} |")
    lines += [
        f"| nvJPEG on the GPU (decode; decode + resize + crop) | {_fmt(d.get('nvjpeg'), 'decode_images_per_s')}; "
        f"{_fmt(d.get('nvjpeg'), 'decode_resize_images_per_s')} |",
        "",
    ]
    lines += [
        "| backbone | GFLOP/image | naive loop, images/s (steady) | extract defaults (precision), images/s "
        "(steady) | defaults / naive (steady) | extract fp32 | extract fp16 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in RESULTS["backbones"].items():
        ex, nv = r.get("extract", {}), r.get("naive", {})
        ratio = (
            f"{ex['steady_images_per_s'] / nv['steady_images_per_s']:.1f}x"
            if "steady_images_per_s" in ex and "steady_images_per_s" in nv
            else "-"
        )
        lines.append(
            f"| {name} | {r.get('gflop', 0):.2f} | {_pair(nv)} | {_pair(ex)} ({ex.get('precision', '?')}) | "
            f"{ratio} | {_pair(r.get('extract_fp32'))} | {_pair(r.get('extract_fp16'))} |"
        )
    lines += [
        "",
        "| backbone, model alone, images/s | fp32 b64 | fp32 b256 | bf16 b64 | bf16 b256 | fp16 b64 |"
        " fp16 b256 | best bf16 as % of the bf16 matmul ceiling |",
        "| --- " * 8 + "|",
    ]
    for name, r in RESULTS["backbones"].items():
        m = r.get("model", {})
        cells = [_fmt(m.get(f"{p}-{b}")) for p in DTYPES for b in (64, 256)]
        best = max((m.get(f"bf16-{b}", {}).get("images_per_s", 0) for b in (64, 256)), default=0)
        share = best * r.get("gflop", 0) / 1e3 / c["bf16"] * 100 if c.get("bf16") else 0
        lines.append(f"| {name} | {' | '.join(cells)} | {share:.0f} % |")
    lines += [
        "",
        "| backbone | relative error, GPU fp32 vs CPU fp32: mean (max) | GPU bf16 vs CPU fp32: mean (max) |",
        "| --- | --- | --- |",
    ]
    for name, r in RESULTS["backbones"].items():
        a = r.get("agreement", {})
        cells = [f"{a[k]['mean']:.1e} ({a[k]['max']:.1e})" if k in a else "-" for k in ("fp32", "bf16")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    if RESULTS.get("extras"):
        lines += ["", "| resnet50 extract, extras | images/s (steady) |", "| --- | --- |"]
        lines += [f"| {k} | {_pair(v)} |" for k, v in RESULTS["extras"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--images", type=int, default=4096, help="images per extract run")
    parser.add_argument("--naive-images", type=int, default=1024)
    parser.add_argument("--agree-images", type=int, default=64)
    parser.add_argument("--image-folder", default=None, help="JPEGs to repeat (default: isic_cc0_200, else the sample)")
    parser.add_argument("--matmul", type=int, default=8192, help="matrix size of the ceiling")
    parser.add_argument("--iters", type=int, default=10, help="timed batches of the model-only runs")
    parser.add_argument("--budget-s", type=float, default=360, help="the extras run only while this much is not spent")
    parser.add_argument("--parts", default=",".join(PARTS), help="which measurements (comma-separated)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the random-init warnings, once per run, are expected here
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a machine with an NVIDIA GPU")
    folder = Path(args.image_folder) if args.image_folder else next(p for p in DEFAULT_IMAGES if p.is_dir())
    files = sorted(p.resolve() for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    import torchvision

    RESULTS.update(
        card=torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)",
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        cpus=os.cpu_count(),
        python=platform.python_version(),
        images=args.images,
        image_folder=f"{folder} ({len(files)} files)",
        backbones={},
        decode={},
        extras={},
    )
    print(json.dumps({k: v for k, v in RESULTS.items() if not isinstance(v, dict)}), flush=True)
    rows = manifest(files, args.images, work, "img")
    few = manifest(files, args.agree_images, work, "agree")
    parts = set(args.parts.split(","))
    if "ceilings" in parts:
        RESULTS["ceilings"] = check.step("ceilings", ceilings, args.device, args.matmul)
    d = RESULTS["decode"]
    if "decode" in parts:
        d["one_core"] = check.step("decode, one core", decode_one_core, files, 200)
        for workers in sorted({4, 8, max(0, (os.cpu_count() or 1) - 1)}):
            d[f"loader-{workers}"] = check.step(
                f"loader {workers} workers", decode_loader, files, args.images, workers, 64, args.device
            )
        if args.device == "cuda":
            d["nvjpeg"] = check.step("nvjpeg", decode_nvjpeg, files, 512)
    for name in args.backbones.split(","):
        r = RESULTS["backbones"][name] = {}
        weights = work / f"{name}.pt"  # one random init, the same weights on both devices
        torch.save(load_backbone(name, "none").module.state_dict(), weights)
        if "extract" in parts:
            r["extract"] = check.step(
                f"{name} extract defaults", run_extract, name, weights, rows, work / f"{name}.h5", args.device
            )
            for p in ("fp32", "fp16"):
                r[f"extract_{p}"] = check.step(
                    f"{name} extract {p}",
                    run_extract,
                    name,
                    weights,
                    rows,
                    work / f"{name}-{p}.h5",
                    args.device,
                    precision=p,
                )
        if "naive" in parts:
            r["naive"] = check.step(f"{name} naive", naive, name, args.device, files, args.naive_images)
        r["gflop"] = check.step(f"{name} GFLOP", gflop_per_image, name)
        if "model" in parts:
            r["model"] = {
                f"{p}-{b}": check.step(f"{name} model {p} batch {b}", model_only, name, args.device, p, b, args.iters)
                for p in DTYPES
                for b in (64, 256)
            }
        if "agreement" in parts:
            r["agreement"] = check.step(f"{name} agreement", agreement, name, weights, few, work, args.device)
    name = "resnet50"
    weights = work / f"{name}.pt"
    extras: list[tuple[str, dict]] = [("defaults, again (a warm process)", {})]
    extras += [(f"workers {w}", {"workers": w}) for w in (4, 8)]
    extras += [(f"batch {b}", {"batch_size": b}) for b in (128, 256)] + [("--compile on", {"compile": "on"})]
    for label, options in extras:
        if "extras" not in parts:
            break
        if check.left() <= 0 or not weights.is_file():
            RESULTS["extras"][label] = {"skipped": "time budget spent"}
            continue
        RESULTS["extras"][label] = check.step(
            f"{name} extract {label}",
            run_extract,
            name,
            weights,
            rows,
            work / f"{name}-extra.h5",
            args.device,
            **options,
        )
    check.save()
    text = tables()
    (out / "gpu_check.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
