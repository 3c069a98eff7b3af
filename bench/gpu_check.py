"""The GPU path, checked in a few minutes on a machine with an NVIDIA GPU (run by bench/gpu_check.sh).

For each backbone: `extract` throughput on the GPU in fp32, bf16 and fp16 (the same code path and
defaults a user gets with --device cuda), and whether GPU and CPU embeddings of the same images with
the same weights agree (relative error of fp32 GPU and bf16 GPU embeddings against fp32 CPU ones). Images are the
repo's CC0 sample, repeated under new ids to --images rows. Decoding is on the CPU (DataLoader
workers, pinned memory, non-blocking copies); nothing is decoded on the GPU.

    python bench/gpu_check.py [--backbones ...] [--images 1920] [--json FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extract.backbones import load_backbone  # noqa: E402
from extract.run import ExtractConfig, extract  # noqa: E402
from features.store import FeatureStore  # noqa: E402

SAMPLE = ROOT / "samples" / "isic_cc0"
BACKBONES = "resnet50,vgg11,densenet121,inception_v3,efficientnet_lite0"


def manifest(n: int, folder: Path) -> Path:
    files = sorted(p for p in SAMPLE.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    path = folder / f"rows{n}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "path"])
        for i in range(n):
            writer.writerow([f"img{i:06d}", str(files[i % len(files)])])
    return path


def run(name: str, weights: Path, rows: Path, out: Path, device: str, precision: str
        ) -> tuple[float, float, np.ndarray]:  # fmt: skip
    out.unlink(missing_ok=True)
    started = time.monotonic()
    summary = extract(ExtractConfig(data=str(rows), backbone=name, weights=str(weights), out=str(out),
                                    device=device, precision=precision))  # fmt: skip
    seconds = time.monotonic() - started
    return summary.embedded[name] / seconds, summary.steady_images_per_s, FeatureStore(out).embeddings(name)


def relative_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per image |a - b| / |b| (sharper than cosine similarity for random-init networks, whose
    embeddings all point much the same way)."""
    return np.linalg.norm(a - b, axis=1) / (np.linalg.norm(b, axis=1) + 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=BACKBONES)
    parser.add_argument("--images", type=int, default=1920)
    parser.add_argument("--agree-images", type=int, default=64)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a machine with an NVIDIA GPU")
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    rows, few = manifest(args.images, work), manifest(args.agree_images, work)
    print(f"{card}; torch {torch.__version__}; {args.images} images ({SAMPLE.name}, decoded on the CPU)")
    print("\n| backbone | fp32 images/s (steady) | bf16 images/s (steady) | fp16 images/s (steady) | bf16/fp32 |"
          " relative error GPU fp32 vs CPU fp32 (max) | relative error GPU bf16 vs CPU fp32 (max) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = {"card": card, "torch": torch.__version__, "images": args.images, "backbones": {}}
    for name in args.backbones.split(","):
        weights = work / f"{name}.pt"  # one random init, the same weights on both devices
        torch.save(load_backbone(name, "none").module.state_dict(), weights)
        speed = {p: run(name, weights, rows, work / f"{name}-{p}.h5", args.device, p)[:2]
                 for p in ("fp32", "bf16", "fp16")}  # fmt: skip
        cpu = run(name, weights, few, work / f"{name}-cpu.h5", "cpu", "fp32")[2]
        gpu32 = run(name, weights, few, work / f"{name}-g32.h5", args.device, "fp32")[2]
        gpu16 = run(name, weights, few, work / f"{name}-g16.h5", args.device, "bf16")[2]
        e32, e16 = relative_error(gpu32, cpu), relative_error(gpu16, cpu)
        results["backbones"][name] = {"speed": speed, "relative_error_fp32": [float(e32.mean()), float(e32.max())],
                                      "relative_error_bf16": [float(e16.mean()), float(e16.max())]}  # fmt: skip
        cells = " | ".join(f"{a:.0f} ({s:.0f})" for a, s in speed.values())
        ratio = max(speed["bf16"]) / max(speed["fp32"])
        print(f"| {name} | {cells} | {ratio:.1f}x | {e32.mean():.1e} ({e32.max():.1e}) |"
              f" {e16.mean():.1e} ({e16.max():.1e}) |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
