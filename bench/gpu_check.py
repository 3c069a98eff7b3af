"""The GPU path, checked in a few minutes on a machine with an NVIDIA GPU (run by bench/gpu_check.sh).

`extract --decode pil` decodes, resizes and crops with Pillow in the DataLoader's workers (the path the
README's first GPU figures measured); `--decode torch` has the workers only read the JPEG files and
decodes whole batches with nvJPEG, then resizes and crops, on the GPU (`auto` picks it for a new store). Both
are measured side by side. What it measures, in this order (the most important first, so a run cut
short still says something):

1. the card's matrix-product ceilings (8192^3; fp32 with TF32 off, TF32, bf16, fp16);
2. decoding with no model behind it (the most `extract` can reach): PIL decode + resize + crop per CPU
   core; `extract`'s DataLoader with several worker counts, once with `--decode pil` and once with
   `--decode torch` (each batch through `TorchDecoder.finish`: nvJPEG, orient, resize, crop on the GPU);
   and nvJPEG alone on 512 files for scale;
3. per backbone: `extract --device cuda` with `--decode torch` and then `--decode pil` (bf16, the
   default precision on CUDA; every other option at its default; torch first, so that it, not the
   comparison, pays for cuDNN's choice of kernels, which the pil run's workers hide by decoding
   meanwhile); the naive loop on the GPU (per-batch PIL decode in the main process, fp32, NCHW, batch
   32); the model alone on random pixels already on the GPU (fp32, bf16, fp16 at batch 64 and 256: the
   GPU's own limit); and agreement (relative error per image) of the GPU's embeddings with the CPU's
   (fp32, `--decode pil`) on the same images and weights: GPU fp32 and bf16 with each decoder, and GPU
   fp32 torch-decoded against GPU fp32 pil-decoded (the decoder alone);
4. while the time budget lasts: resnet50's `extract --decode torch` with other worker counts, batch
   sizes and --compile; then each backbone with --precision fp32 and fp16 (`--precisions-decode`);
5. the target: resnet50 bf16 `extract --decode torch` at >= 5,000 images/s overall and >= 80 % of the
   lower of its two bounds (the model alone at the extract batch size, bf16; the torch decoder alone
   with extract's worker count, steady), printed as PASS or FAIL with the figures.

Images: the given folder's JPEGs (default: isic_cc0_200, 600 px, CC0, from ../shared/data or from the
checkout's own shared/data, where a lent GPU machine gets it; else the 341 px sample) repeated under new
ids. Weights: one random init per backbone saved to a file, the same on both devices (speed does not
depend on the weights' values). Results go to --out as JSON after every step, and as markdown tables
at the end.

    python bench/gpu_check.py [--backbones ...] [--images 16384] [--out DIR] [--device cpu (a dry run)]
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.backbones import load_backbone  # noqa: E402
from extract.decoding import DECODERS  # noqa: E402
from extract.images import load_image  # noqa: E402
from extract.runtimes import PixelModel  # noqa: E402
from extract.run import ExtractConfig, cuda_settings, extract  # noqa: E402
from features.store import FeatureStore  # noqa: E402

BACKBONES = "resnet50,efficientnet_lite0,densenet121,inception_v3,vgg11"
DEFAULT_IMAGES = [
    ROOT.parent / "shared" / "data" / "isic_cc0_200" / "images",
    ROOT / "shared" / "data" / "isic_cc0_200" / "images",  # copied into the checkout for a lent GPU machine
    ROOT / "samples" / "isic_cc0" / "images",  # 341x256: smaller than the 600x450 the GPU figures are of
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PARTS = ("ceilings", "decode", "extract", "naive", "model", "agreement", "extras", "precisions")
MODEL_BATCHES = (64, 256)
TARGET_IMAGES_PER_S = 5000
TARGET_SHARE = 0.8
"""The target (issue 19): resnet50 bf16 `extract --decode torch` at this many images/s overall, and at
this share of the lower of its bounds (the model alone, the torch decoder alone)."""
RESULTS: dict = {}


class Check:
    """Where the results go, and the time budget that decides whether the extras and precisions run."""

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


def decode_loader(files: list[Path], n: int, workers: int, batch: int, device: str, decode: str) -> dict:
    """`extract`'s own DataLoader and decoder (`--decode pil`: decode, resize, crop, collate, pin in the
    workers; `torch`: the workers read the files, the main process decodes, resizes and crops each batch
    on the GPU; on a CPU device the workers decode with torchvision) with no model: the most `extract`
    can reach with this decoder."""
    from torch.utils.data import DataLoader

    dev = torch.device(device)
    decoder = DECODERS[decode](
        [files[i % len(files)] for i in range(n)], [load_backbone("resnet50", "none").preprocess], dev
    )
    loader = DataLoader(
        decoder.dataset(),
        batch_size=batch,
        num_workers=workers,
        collate_fn=decoder.collate,
        pin_memory=device == "cuda" and decoder.pin_memory,
    )
    started, first, seen = time.perf_counter(), None, 0
    for batch_of_files in loader:
        pictures = decoder.finish(batch_of_files, dev)
        pictures.images[0].to(dev, non_blocking=True)  # the pil path's copy; already there for torch
        if first is None:
            sync(device)  # the first batch (workers starting, nvJPEG's set-up) is not steady
            first = time.perf_counter()
        else:
            seen += len(pictures.positions)
    sync(device)
    end = time.perf_counter()
    return {
        "images_per_s": n / (end - started),
        "steady_images_per_s": seen / (end - first),
        "workers": workers,
        "decode": decode,
        "fallbacks": decoder.fallbacks,  # images the torch decoder left to Pillow: 0 for these JPEGs
    }


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
def run_extract(name: str, weights: Path, rows: Path, out: Path, device: str, keep: bool = False, **options) -> dict:
    """`extract` as a user runs it (options not given keep their defaults), timed from the call. The
    store is removed afterwards unless `keep` (16,384 rows of vgg11 are 270 MB)."""
    out.unlink(missing_ok=True)
    cfg = ExtractConfig(data=str(rows), backbone=name, weights=str(weights), out=str(out), device=device, **options)
    started = time.monotonic()
    summary = extract(cfg)
    seconds = time.monotonic() - started
    resolved = cfg.resolved()
    if not keep:
        out.unlink(missing_ok=True)
    return {
        "images_per_s": summary.embedded[name] / seconds,
        "steady_images_per_s": summary.steady_images_per_s,
        "seconds": seconds,
        "precision": resolved.precision,
        "decode": resolved.decode,
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
    return {"images_per_s": n / (end - started), "steady_images_per_s": max(0, n - 32) / max(end - first, 1e-9)}


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image |a - b| / |b| (sharper than cosine similarity for random-init networks, whose
    embeddings all point much the same way)."""
    return np.linalg.norm(a - b, axis=1) / (np.linalg.norm(b, axis=1) + 1e-12)


AGREEMENT_RUNS = (
    ("cpu", "fp32", "pil"),
    ("fp32", "fp32", "pil"),
    ("bf16", "bf16", "pil"),
    ("torch_fp32", "fp32", "torch"),
    ("torch_bf16", "bf16", "torch"),
)
"""label, precision, decoder of the agreement's extract runs: `cpu` on the CPU, the rest on the device."""
COMPARISONS = {
    "fp32": ("fp32", "cpu"),
    "bf16": ("bf16", "cpu"),
    "torch_fp32": ("torch_fp32", "cpu"),
    "torch_bf16": ("torch_bf16", "cpu"),
    "torch_vs_pil_fp32": ("torch_fp32", "fp32"),
}
"""label -> (embeddings, reference): the GPU's against the CPU's fp32 pil-decoded ones, and the GPU's fp32
torch-decoded against its own fp32 pil-decoded ones (which isolates the decoder)."""


def agreement(name: str, weights: Path, rows: Path, work: Path, device: str) -> dict:
    embeddings = {}
    for label, precision, decode in AGREEMENT_RUNS:
        store = work / f"{name}-agree-{label}.h5"
        dev = "cpu" if label == "cpu" else device
        # two workers: the images are one or two batches, and a pool of fifteen would only add start-up
        run_extract(name, weights, rows, store, dev, keep=True, precision=precision, decode=decode, workers=2)
        embeddings[label] = FeatureStore(store).embeddings(name)
        store.unlink()
    out = {}
    for label, (a, b) in COMPARISONS.items():
        e = relative_error(embeddings[a], embeddings[b])
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


# ----------------------------------------------------------------------------------------- the target
def decoder_alone(workers: int) -> tuple[float, int] | None:
    """The torch decoder's steady rate with no model, and its worker count: `workers` (extract's) if
    measured, else the best measured."""
    loaders = [v for k, v in RESULTS["decode"].items() if k.startswith("torch-loader") and "steady_images_per_s" in v]
    if not loaders:
        return None
    same = [v for v in loaders if v["workers"] == workers]
    best = same[0] if same else max(loaders, key=lambda v: v["steady_images_per_s"])
    return best["steady_images_per_s"], best["workers"]


def target() -> dict:
    """The issue's target for resnet50 bf16 `extract --decode torch`, and the figures it is judged on."""
    r = RESULTS["backbones"].get("resnet50", {})
    ex = r.get("extract_torch", {})
    if "images_per_s" not in ex:
        return {
            "verdict": "not measured",
            "text": ["target: not measured (no resnet50 `extract --decode torch` result)"],
        }
    model = r.get("model", {}).get(f"bf16-{ex['batch_size']}", {}).get("images_per_s")
    decoder = decoder_alone(ex["workers"])
    if model is None or decoder is None:
        missing = "the model alone (bf16, batch %d)" % ex["batch_size"] if model is None else "the torch decoder alone"
        return {"verdict": "not measured", "text": [f"target: not judged ({missing} not measured)"]}
    rate = ex["images_per_s"]
    bound, bounded_by = min((model, "the model"), (decoder[0], "the decoder"))
    fast, share = rate >= TARGET_IMAGES_PER_S, rate / bound
    verdict = "PASS" if fast and share >= TARGET_SHARE else "FAIL"
    text = [
        f"target {verdict}: resnet50 {ex['precision']} `extract --decode torch` {rate:.0f} images/s overall "
        f"(steady {ex['steady_images_per_s']:.0f}; >= {TARGET_IMAGES_PER_S}: {'yes' if fast else 'no'}), "
        f"{share * 100:.0f} % of min(model alone, "
        f"{ex['precision']} batch {ex['batch_size']}: {model:.0f}; torch decoder alone, {decoder[1]} workers, "
        f"steady: {decoder[0]:.0f}) (>= {TARGET_SHARE * 100:.0f} %: {'yes' if share >= TARGET_SHARE else 'no'})"
    ]
    if verdict == "FAIL":
        # the lower bound caps the rate; below 80 % of it, the cost is extract's own, not either bound's
        text.append(
            f"bounded by {bounded_by} ({bound:.0f} images/s alone"
            + (f", itself under {TARGET_IMAGES_PER_S})" if bound < TARGET_IMAGES_PER_S else ")")
            + (
                f"; extract reaches {share * 100:.0f} % of it: the rest is extract's own start-up and loop"
                if share < TARGET_SHARE
                else ""
            )
        )
    return {
        "verdict": verdict,
        "images_per_s": rate,
        "model_alone": model,
        "decoder_alone": decoder[0],
        "bounded_by": bounded_by,
        "text": text,
    }


# ----------------------------------------------------------------------------------------- tables
def _fmt(result: dict | None, key: str = "images_per_s") -> str:
    if not isinstance(result, dict) or key not in result:
        return next((k for k in ("error", "skipped") if k in (result or {})), "-")
    return f"{result[key]:.0f}"


def _pair(result: dict | None) -> str:
    """'overall (steady)' images/s."""
    return f"{_fmt(result)} ({_fmt(result, 'steady_images_per_s')})"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    a, b = a or {}, b or {}
    return f"{a[key] / b[key]:.1f}x" if key in a and key in b and b[key] else "-"


def decoding_table() -> list[str]:
    d = RESULTS["decode"]
    where = "the GPU" if RESULTS["device"] == "cuda" else "the CPU"
    lines = [
        "| decoding (resnet50's resize/crop), no model, images/s | overall (steady) |",
        "| --- | --- |",
        f"| one CPU core, PIL | {_fmt(d.get('one_core'))} |",
    ]
    for key, value in d.items():
        if key.startswith("loader"):
            lines.append(
                f"| extract's DataLoader, `--decode pil`, {key.split('-')[-1]} workers (PIL) | {_pair(value)} |"
            )
    for key, value in d.items():
        if key.startswith("torch-loader"):
            lines.append(
                f"| extract's DataLoader, `--decode torch`, {key.split('-')[-1]} workers (read the files; decode, "
                f"resize, crop on {where}) | {_pair(value)} |"
            )
    nv = d.get("nvjpeg")
    return lines + [
        f"| nvJPEG alone on the GPU, 512 files in one batch (decode; decode + resize + crop) | "
        f"{_fmt(nv, 'decode_images_per_s')}; {_fmt(nv, 'decode_resize_images_per_s')} |",
        "",
    ]


def extract_table() -> list[str]:
    lines = [
        f"| backbone ({RESULTS['images']} images) | GFLOP/image | naive loop, images/s (steady) | "
        "`extract --decode pil` (precision), images/s (steady) | pil / naive (steady) | "
        "`extract --decode torch` (precision) | torch / pil |",
        "| --- " * 7 + "|",
    ]
    for name, r in RESULTS["backbones"].items():
        nv, pil, tv = r.get("naive"), r.get("extract_pil", {}), r.get("extract_torch", {})
        lines.append(
            f"| {name} | {r.get('gflop', 0):.2f} | {_pair(nv)} | {_pair(pil)} ({pil.get('precision', '?')}) | "
            f"{_ratio(pil, nv, 'steady_images_per_s')} | {_pair(tv)} ({tv.get('precision', '?')}) | "
            f"{_ratio(tv, pil, 'images_per_s')} |"
        )
    if any(f"extract_{p}" in r for r in RESULTS["backbones"].values() for p in ("fp32", "fp16")):
        decode = RESULTS["precisions_decode"]
        lines += ["", f"| backbone, `extract --decode {decode}`, images/s (steady) | --precision fp32 | fp16 |"]
        lines += ["| --- | --- | --- |"]
        for name, r in RESULTS["backbones"].items():
            lines.append(f"| {name} | {_pair(r.get('extract_fp32'))} | {_pair(r.get('extract_fp16'))} |")
    return lines + [""]


def model_table() -> list[str]:
    c = RESULTS.get("ceilings", {})
    lines = [
        "| backbone, model alone, images/s | "
        + " | ".join(f"{p} b{b}" for p in DTYPES for b in MODEL_BATCHES)
        + " | best bf16 as % of the bf16 matmul ceiling |",
        "| --- " * (2 + len(DTYPES) * len(MODEL_BATCHES)) + "|",
    ]
    for name, r in RESULTS["backbones"].items():
        m = r.get("model", {})
        cells = [_fmt(m.get(f"{p}-{b}")) for p in DTYPES for b in MODEL_BATCHES]
        best = max((m.get(f"bf16-{b}", {}).get("images_per_s", 0) for b in MODEL_BATCHES), default=0)
        share = best * r.get("gflop", 0) / 1e3 / c["bf16"] * 100 if c.get("bf16") else 0
        lines.append(f"| {name} | {' | '.join(cells)} | {share:.0f} % |")
    return lines + [""]


def agreement_table() -> list[str]:
    columns = {
        "fp32": "GPU fp32 pil vs CPU",
        "bf16": "GPU bf16 pil vs CPU",
        "torch_fp32": "GPU fp32 torch vs CPU",
        "torch_bf16": "GPU bf16 torch vs CPU",
        "torch_vs_pil_fp32": "GPU fp32: torch vs pil",
    }
    lines = [
        "| backbone, relative error per image, mean (max); CPU = CPU fp32 `--decode pil` | "
        + " | ".join(columns.values())
        + " |",
        "| --- " * (1 + len(columns)) + "|",
    ]
    for name, r in RESULTS["backbones"].items():
        a = r.get("agreement", {})
        cells = [f"{a[k]['mean']:.1e} ({a[k]['max']:.1e})" if k in a else "-" for k in columns]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return lines


def tables() -> str:
    lines = [
        f"{RESULTS['card']}; torch {RESULTS['torch']}, torchvision {RESULTS['torchvision']}; "
        f"{RESULTS['cpus']} CPU cores; {RESULTS['images']} images from {RESULTS['image_folder']}",
        "",
    ]
    c = RESULTS.get("ceilings", {})
    if c and "error" not in c:
        lines += [
            "| matrix product 8192^3, TFLOP/s | fp32 | tf32 | bf16 | fp16 |",
            "| --- | --- | --- | --- | --- |",
            "| measured | " + " | ".join(f"{c.get(k, 0):.0f}" for k in ("fp32", "tf32", "bf16", "fp16")) + " |",
            "",
        ]
    lines += decoding_table() + extract_table() + model_table() + agreement_table()
    if RESULTS.get("extras"):
        lines += ["", "| resnet50 `extract --decode torch`, extras | images/s (steady) |", "| --- | --- |"]
        lines += [f"| {k} | {_pair(v)} |" for k, v in RESULTS["extras"].items()]
    return "\n".join([*lines, "", *RESULTS["target"]["text"]])


# ----------------------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """What every measurement shares: the device, the image files, the manifests (`rows` for the
    extract runs, `few` for the agreement) and the working folder (weights and stores)."""

    device: str
    files: list[Path]
    rows: Path
    few: Path
    work: Path
    args: argparse.Namespace


def measure_decoding(check: Check, plan: Plan) -> None:
    d, n = RESULTS["decode"], plan.args.images
    d["one_core"] = check.step("decode, one core", decode_one_core, plan.files, 200)
    workers = sorted({4, 8, max(0, (os.cpu_count() or 1) - 1)})  # 15 (all but one core) is extract's default
    for decode, prefix in (("pil", "loader"), ("torch", "torch-loader")):
        for w in workers:
            d[f"{prefix}-{w}"] = check.step(
                f"loader --decode {decode}, {w} workers", decode_loader, plan.files, n, w, 64, plan.device, decode
            )
    if plan.device == "cuda":
        d["nvjpeg"] = check.step("nvjpeg", decode_nvjpeg, plan.files, 512)


def measure_backbone(check: Check, plan: Plan, name: str, parts: set[str]) -> None:
    r = RESULTS["backbones"][name] = {}
    weights = plan.work / f"{name}.pt"  # one random init, the same weights on both devices
    torch.save(load_backbone(name, "none").module.state_dict(), weights)
    if "extract" in parts:
        for decode in ("torch", "pil"):  # torch first: the module docstring says why
            r[f"extract_{decode}"] = check.step(
                f"{name} extract --decode {decode}",
                run_extract,
                name,
                weights,
                plan.rows,
                plan.work / f"{name}.h5",
                plan.device,
                decode=decode,
            )
    if "naive" in parts:
        r["naive"] = check.step(f"{name} naive", naive, name, plan.device, plan.files, plan.args.naive_images)
    r["gflop"] = check.step(f"{name} GFLOP", gflop_per_image, name)
    if "model" in parts:
        # the extract runs' batch too (64 on CUDA, 16 in a CPU dry run): the target is judged at it
        batches = sorted({*MODEL_BATCHES, r.get("extract_torch", {}).get("batch_size", MODEL_BATCHES[0])})
        r["model"] = {
            f"{p}-{b}": check.step(f"{name} model {p} batch {b}", model_only, name, plan.device, p, b, plan.args.iters)
            for p in DTYPES
            for b in batches
        }
    if "agreement" in parts:
        r["agreement"] = check.step(f"{name} agreement", agreement, name, weights, plan.few, plan.work, plan.device)


def later_runs(backbones: list[str], parts: set[str], decode: str) -> list[tuple[dict, str, str, dict]]:
    """The extract runs made while the time budget lasts, in order: (where the result goes, its key, the
    backbone, extract's options)."""
    runs: list[tuple[dict, str, str, dict]] = []
    if "extras" in parts:
        extras: list[tuple[str, dict]] = [("--decode torch, again (a warm process)", {})]
        extras += [(f"workers {w}", {"workers": w}) for w in (4, 8)]
        extras += [(f"batch {b}", {"batch_size": b}) for b in (128, 256)] + [("--compile on", {"compile": "on"})]
        runs += [(RESULTS["extras"], label, "resnet50", {"decode": "torch", **o}) for label, o in extras]
    if "precisions" in parts:
        runs += [
            (RESULTS["backbones"][name], f"extract_{p}", name, {"decode": decode, "precision": p})
            for name in backbones
            for p in ("fp32", "fp16")
        ]
    return runs


def measure_later(check: Check, plan: Plan, runs: list[tuple[dict, str, str, dict]]) -> None:
    for results, key, name, options in runs:
        weights = plan.work / f"{name}.pt"
        if not weights.is_file():
            continue  # the backbone was not measured
        if check.left() <= 0:
            results[key] = {"skipped": "time budget spent"}
            continue
        results[key] = check.step(
            f"{name} extract {options}",
            run_extract,
            name,
            weights,
            plan.rows,
            plan.work / f"{name}-later.h5",
            plan.device,
            **options,
        )


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--images", type=int, default=16384, help="images per extract run and per decoding run")
    parser.add_argument("--naive-images", type=int, default=1024)
    parser.add_argument("--agree-images", type=int, default=64)
    parser.add_argument("--image-folder", default=None, help="JPEGs to repeat (default: isic_cc0_200, else the sample)")
    parser.add_argument("--matmul", type=int, default=8192, help="matrix size of the ceiling")
    parser.add_argument("--iters", type=int, default=10, help="timed batches of the model-only runs")
    parser.add_argument(
        "--budget-s", type=float, default=360, help="the extras and precisions run only while this much is not spent"
    )
    parser.add_argument(
        "--precisions-decode",
        default="torch",
        choices=sorted(DECODERS),
        help="the decoder of the --precision fp32/fp16 runs (torch: where the model, and so the precision, "
        "can bound extract)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="which measurements (comma-separated)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU")
    return parser.parse_args()


def main() -> None:
    args = arguments()
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
        device=args.device,
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        cpus=os.cpu_count(),
        python=platform.python_version(),
        images=args.images,
        image_folder=f"{folder} ({len(files)} files)",
        precisions_decode=args.precisions_decode,
        backbones={},
        decode={},
        extras={},
        target={"text": ["target: not measured"]},
    )
    print(json.dumps({k: v for k, v in RESULTS.items() if not isinstance(v, dict)}), flush=True)
    plan = Plan(
        args.device,
        files,
        manifest(files, args.images, work, "img"),
        manifest(files, args.agree_images, work, "agree"),
        work,
        args,
    )
    parts, backbones = set(args.parts.split(",")), args.backbones.split(",")
    if "ceilings" in parts:
        RESULTS["ceilings"] = check.step("ceilings", ceilings, args.device, args.matmul)
    if "decode" in parts:
        measure_decoding(check, plan)
    for name in backbones:
        measure_backbone(check, plan, name, parts)
    measure_later(check, plan, later_runs(backbones, parts, args.precisions_decode))
    RESULTS["target"] = target()
    check.save()
    text = tables()
    (out / "gpu_check.md").write_text(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
