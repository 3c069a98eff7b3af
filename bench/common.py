"""What several benchmark scripts share: the real data set, and manifests of its first N images."""

from __future__ import annotations

import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ham10000_mel_nv_150"
IN_MEMORY = 1 << 40
"""A memory budget for `classify.fit.load_data` under which this set's embeddings always stay in memory."""


def first_images(n: int, folder: Path) -> Path:
    """A manifest of the data set's first n images (past its 2000, the same files again under new
    ids, so that a benchmark can ask for more images than there are)."""
    rows = list(csv.DictReader(open(DATA / "labels.csv")))
    picked = [
        dict(rows[i % len(rows)], image_id=f"{rows[i % len(rows)]['image_id']}_{i // len(rows)}") for i in range(n)
    ]
    path = folder / f"first{n}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(picked[0]))
        writer.writeheader()
        writer.writerows(picked)
    return path
