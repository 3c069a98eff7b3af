"""report.html, opened in a real browser: self-contained (no request leaves the page), every image
loads, the sections, the error gallery and the embedding map are there, and it is not blank."""

from __future__ import annotations

import io
import re

import numpy as np
from browser import visit
from PIL import Image

from features.store import FeatureStore


def test_the_report_of_a_real_run_opens_offline_in_chromium(lite0_runs, tmp_path):
    page = lite0_runs / "linear" / "report.html"
    text = page.read_text()
    # nothing outside the file: no link, script or stylesheet to another file or host
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert "<script" not in text
    seen = visit(page)
    assert seen.requests[0] == page.resolve().as_uri()
    assert all(url.startswith(("file:", "data:")) for url in seen.requests), seen.requests
    assert not seen.failed and not seen.console_errors, (seen.failed, seen.console_errors)
    assert seen.broken_images == [] and seen.images >= 4 + 2  # the plots, and at least one gallery case
    for heading in ("Headline", "Clinical figures", "Calibration", "Plots", "Error gallery", "Embedding map"):
        assert heading in seen.headings, seen.headings
    # the map: a point per image of the store, each naming its image on hover
    ids = set(FeatureStore(lite0_runs / "store.h5").column("image_id"))
    assert seen.svg_points >= len(ids)
    assert seen.titles and all(t.split(":")[0] in ids for t in seen.titles), seen.titles[:3]
    # the gallery: thumbnails with the heatmap of Grad-CAM beside them (a linear run is differentiable)
    assert 'alt="heatmap of ' in text
    shot = np.asarray(Image.open(io.BytesIO(seen.screenshot)).convert("RGB"))
    assert shot.shape[0] > 2000  # the whole page, not one screen of it
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 500  # text, tables and plots
    (tmp_path / "report.png").write_bytes(seen.screenshot)
