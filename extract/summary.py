"""What an extraction did, and how `cli.py extract` reports it: the store's rows, each backbone's
provenance, this run's work and the images that could not be used."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from features.store import license_caveat
from features.store import FeatureStore

__all__ = ["MOSTLY_FAILED", "Summary"]

MOSTLY_FAILED = 0.5
"""Above this share of unusable images the report's last line warns that the run mostly failed (the
exit status follows --max-failed, whose default is the same)."""


@dataclass
class Summary:
    """What an extraction did, for the user and for tests."""

    store: Path
    embedded: dict[str, int] = field(default_factory=dict)
    """Rows embedded by this run, per backbone."""
    failed: dict[str, str] = field(default_factory=dict)
    """Images of this data set that could not be used, with the reason."""
    images: int = 0
    """Images of this data set (rows of its manifest)."""
    seconds: float = 0.0
    steady_images_per_s: float = 0.0
    """Images decoded and embedded per second over the second half of the run (start-up, compiling and
    store writing excluded)."""

    def describe(self, max_failures: int = 20) -> str:
        """What the extraction wrote: rows, usable labelled rows, each backbone's provenance, this run's
        work, failures (the first `max_failures`); when most of the data set failed, the last line says
        so."""
        store = FeatureStore(self.store)
        samples = store.samples()
        embedded = np.zeros(len(samples), dtype=bool)
        for name in store.backbones:
            embedded |= store.done(name)
        labels = Counter(label for label, ok in zip(samples.label, embedded) if label and ok)
        lines = [
            f"wrote {self.store}: {len(samples)} rows, {sum(labels.values())} labelled and usable "
            f"({', '.join(f'{k} {v}' for k, v in labels.most_common()) or 'no labels'}), "
            f"{len(set(samples.group))} groups, {len(store.failed())} failed"
        ]
        licenses = []
        for name in store.backbones:
            a = store.backbone_attrs(name)
            random = "  RANDOM INIT (--weights none)" if a.get("random_init") else ""
            options = "".join(f", {k} {a[k]}" for k in ("pool", "clip_embed", "decode") if k in a)
            lines.append(
                f"  {name}: {a['dim']}-d, {int(store.done(name).sum())}/{len(samples)} rows done, "
                f"weights {a['weights']}, {a['input_size']} px{options}, {a['precision']}, views {a['views']}, "
                f"fingerprint {a['fingerprint']}{random}"
            )
            caveat = license_caveat(str(a["license"])) if "license" in a else None
            if caveat:  # families that record no licence (torchvision's, Lite's) have no attribute
                licenses.append(f"WARNING: {name} weights: {caveat}")
        lines += licenses
        work = ", ".join(f"{n} {k}" for n, k in self.embedded.items())
        speed = self.steady_images_per_s
        steady = f" ({speed:.1f} images/s after the first batch)" if speed else ""
        lines.append(f"this run: embedded {work} in {self.seconds:.1f} s{steady}")
        if self.failed:
            lines.append(f"{len(self.failed)} images of this data set could not be used (kept under /failed):")
            lines += [f"  {i}: {reason}" for i, reason in list(self.failed.items())[:max_failures]]
            if len(self.failed) > max_failures:
                lines.append(f"  ... and {len(self.failed) - max_failures} more")
        share = len(self.failed) / max(self.images, 1)
        if share > MOSTLY_FAILED:
            reason, _ = Counter(self.failed.values()).most_common(1)[0]
            lines.append(
                f"WARNING: {share:.1%} of the images could not be used ({len(self.failed)} of {self.images}; "
                f"most often: {reason}): check that --images is the folder that holds them"
            )
        return "\n".join(lines)
