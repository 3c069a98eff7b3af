"""The sections only report.html has: the error gallery (the test images a run got most confidently
wrong, each beside its explanation heatmap) and the embedding map of the run's store.

Both are drawn after the run's files are written and never stop a run: a store whose images have moved,
weights that cannot be loaded offline, or a run that cannot be explained give a note in their place,
with the reason, and a log line.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np

from classify.html import HtmlSection, image_uri

__all__ = [
    "GALLERY_OCCLUSION_PATCH",
    "GALLERY_SIZE",
    "MAP_COLUMNS",
    "MAP_POINTS",
    "map_column",
    "gallery_section",
    "map_section",
    "worst_errors",
]

log = logging.getLogger("classify")

GALLERY_SIZE = 12
"""Images in the gallery: enough to see a pattern in the errors, few enough to explain while the report
is written."""
GALLERY_OCCLUSION_PATCH = 75
"""Occlusion patch (and stride) of the gallery's heatmaps, in pixels of a 224 px input: a 3 x 3 grid, 9
passes of the backbone per image rather than the 50 of `predict --explain`, so that a report of a
non-differentiable head is written in seconds; coarse, but enough to say where the lesion is."""
MAP_POINTS = 3000
"""Points of the report's embedding map (a stratified sample of larger stores): the page stays light."""


def worst_errors(
    labels: np.ndarray, proba: np.ndarray, classes: list[str], decisions: np.ndarray, positive: str | None
) -> list[int]:
    """Positions of the most confidently wrong rows, worst first. With a positive class: its false
    negatives (lowest probability of it first), then the false positives (highest first). Without: the
    worst of each true class in turn (lowest probability of the true class first), so that every class's
    errors are seen."""
    labels, decisions = np.asarray(labels, dtype=object), np.asarray(decisions, dtype=object)
    wrong = labels != decisions
    if positive is not None and positive in classes:
        p = proba[:, classes.index(positive)]
        missed = np.flatnonzero(wrong & (labels == positive))
        false_alarm = np.flatnonzero(wrong & (labels != positive))
        order = [
            *missed[np.argsort(p[missed], kind="stable")],
            *false_alarm[np.argsort(-p[false_alarm], kind="stable")],
        ]
        return [int(i) for i in order[:GALLERY_SIZE]]
    per_class = []
    for c in classes:
        rows = np.flatnonzero(wrong & (labels == c))
        per_class.append(list(rows[np.argsort(proba[rows, classes.index(c)], kind="stable")]))
    order: list[int] = []
    for rank in range(max((len(r) for r in per_class), default=0)):
        order += [int(r[rank]) for r in per_class if rank < len(r)]
    return order[:GALLERY_SIZE]


def _probabilities(row: np.ndarray, classes: list[str]) -> str:
    top = np.argsort(-row)[:3]
    return ", ".join(f"{html.escape(classes[k])} {row[k]:.2f}" for k in top)


def gallery_section(
    run_folder: Path,
    *,
    ids: np.ndarray,
    files: np.ndarray,
    labels: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    decisions: np.ndarray,
    positive: str | None,
) -> HtmlSection:
    """The error gallery of scored rows (`ids`, their image `files`, true `labels`, the run's calibrated
    `proba` and `decisions`): thumbnail, truth, decision and probabilities, and the run's heatmap."""
    from PIL import Image

    title = "Error gallery"
    picked = worst_errors(labels, proba, classes, decisions, positive)
    if not picked:
        return HtmlSection(title, '<p class="note">No scored image was decided wrongly.</p>')
    order = (
        "false negatives of the positive class first (lowest probability first), then false positives"
        if positive is not None and positive in classes
        else "the worst of each true class in turn"
    )
    intro = f'<p class="note">The {len(picked)} most confidently wrong images, {html.escape(order)}.'
    present = [i for i in picked if files[i] and Path(files[i]).is_file()]
    if len(present) < len(picked):
        intro += f" {len(picked) - len(present)} image files were not found where <code>extract</code> read them."
    heat: dict[int, str] = {}
    if present:
        try:
            from classify.explain import Occlusion, explain, overlay

            coarse = Occlusion(patch=GALLERY_OCCLUSION_PATCH, stride=GALLERY_OCCLUSION_PATCH)
            explained = explain(run_folder, [files[i] for i in present], occlusion=coarse)
            by_file = {Path(e.image_id).stem: e for e in explained}
            for i in present:
                e = by_file.get(Path(files[i]).stem)
                if e is not None:
                    heat[i] = image_uri(overlay(e), size=220, fmt="PNG")
        except Exception as exc:  # a picture must never cost the run: say why it is missing instead
            log.warning("error gallery without heatmaps: %s", exc)
            intro += f" No heatmaps: {html.escape(str(exc))}."
    cases = []
    for i in picked:
        pictures = ""
        if i in present:
            with Image.open(files[i]) as image:
                pictures += f'<img src="{image_uri(image, size=220)}" alt="{html.escape(str(ids[i]))}">'
        if i in heat:
            pictures += f' <img src="{heat[i]}" alt="heatmap of {html.escape(str(ids[i]))}">'
        cases.append(
            f'<div class="case">{pictures}<p><code>{html.escape(str(ids[i]))}</code></p>'
            f"<p>true <b>{html.escape(str(labels[i]))}</b>, decided <b>{html.escape(str(decisions[i]))}</b></p>"
            f"<p>{_probabilities(proba[i], classes)}</p></div>"
        )
    return HtmlSection(title, intro + '</p>\n<div class="gallery">' + "\n".join(cases) + "</div>")


MAP_COLUMNS = ("fitzpatrick", "sex", "age", "localization", "site")
"""Metadata columns the report's map is coloured by when the run names none (`--subgroups`), first found
first: the ones a bias or a shortcut usually hides in."""


def map_column(store, subgroups: list[str]) -> str:
    """The metadata column of the report's map: the run's first `--subgroups` column, else the first of
    MAP_COLUMNS the store has, else its first column; "" for a store without metadata."""
    columns = store.meta_columns()
    for name in [*subgroups, *MAP_COLUMNS, *columns]:
        if name in columns:
            return name
    return ""


def map_section(store_path: Path, *, backbone: str, run_folder: Path | None = None, column: str = "") -> HtmlSection:
    """The store's embedding map coloured by label, by the run's study/test side and by a metadata
    `column` (when given), each an inline SVG whose points name their image on hover."""
    title = "Embedding map"
    try:
        from classify.embedding_map import colouring, compute_map, map_svg

        emap = compute_map(store_path, backbone=backbone, max_points=MAP_POINTS)
        colourings = ["label", "split", *([column] if column else [])]
        figures = []
        for colour in colourings:
            colours = colouring(store_path, emap, colour, run=run_folder)
            figures.append(
                f'<div class="map"><p class="note">coloured by {html.escape(colour)}</p>{map_svg(emap, colours)}</div>'
            )
    except Exception as exc:  # a picture must never cost the run
        log.warning("report without an embedding map: %s", exc)
        return HtmlSection(title, f'<p class="note">No map: {html.escape(str(exc))}.</p>')
    shown = f"{len(emap.image_id)} of {emap.total} images" if len(emap.image_id) < emap.total else "every image"
    intro = (
        f'<p class="note">{html.escape(emap.method)} of the {html.escape(backbone)} embeddings ({shown}); '
        "hover over a point for its image id. Neighbours on the map are neighbours in the embedding; "
        "distances between far clusters mean little.</p>"
    )
    return HtmlSection(title, intro + "\n".join(figures))
