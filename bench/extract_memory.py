"""Peak memory and speed of `cli.py extract` against the number of images (it should not grow).

Runs EfficientNet-Lite0 (real weights) on the first N images of ../shared/data/ham10000_mel_nv_150
(past its 2000 images, the same files again under new ids) for each N, each in a fresh process,
decoding in that process (--workers 0) so that its peak resident
memory covers everything; prints images/s and peak RSS.

    python bench/extract_memory.py [--sizes 1000,4000] [--precision auto] [--runtime auto] [--compile on]

The compiled-model cache is a folder of the benchmark's own, filled by a first run of 64 images, so
that every size reads the same cached model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ham10000_mel_nv_150"


def one(n: int, precision: str, runtime: str, compile: str, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.append(str(ROOT / "bench"))  # after ROOT: bench/extract.py must not shadow the package
    from common import first_images

    from extract.run import ExtractConfig, extract

    manifest = first_images(n, workdir)
    started = time.monotonic()
    summary = extract(
        ExtractConfig(
            data=str(manifest),
            images=str(DATA),
            backbone="efficientnet_lite0",
            out=str(workdir / f"first{n}.h5"),
            workers=0,
            precision=precision,
            runtime=runtime,
            compile=compile,
        )
    )
    seconds = time.monotonic() - started
    return {
        "images": n,
        "seconds": round(seconds, 1),
        "images_per_s": round(n / seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "embedded": summary.embedded["efficientnet_lite0"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--compile", default="on", help="the same for every size (auto would differ by size)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.precision, args.runtime, args.compile, Path(args.workdir))))
        return
    print(
        f"{'images':>7} {'seconds':>8} {'images/s':>9} {'peak RSS MB':>12}"
        f"   (efficientnet_lite0, precision {args.precision}, runtime {args.runtime}, --compile {args.compile})"
    )
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "SKINLESION_CACHE": str(Path(workdir) / "cache")}
        for n in [64] + [int(s) for s in args.sizes.split(",")]:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    str(n),
                    "--workdir",
                    workdir,
                    "--precision",
                    args.precision,
                    "--runtime",
                    args.runtime,
                    "--compile",
                    args.compile,
                ],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            if n == 64:
                continue  # (the run that fills the cache)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['images']:>7} {r['seconds']:>8} {r['images_per_s']:>9} {r['peak_rss_mb']:>12}")


if __name__ == "__main__":
    main()
