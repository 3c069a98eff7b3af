"""Run folders: the fitted head and everything needed to apply it again, saved safely and verified.

`run.json` is the run's card: head name and parameters, classes, the inputs (backbones, views,
metadata encoder), the split it was tested on, and per backbone the extraction identity (weights,
precision, views, fingerprint) that `predict` must reproduce. It also records the SHA-256 of each head
file, and of `ood.npz` beside them (the out-of-distribution description, classify/ood.py) where the
run has one. Loading checks those hashes before reading anything, and every head format holds data only
(npz without pickle, tensors with weights_only, XGBoost UBJSON), so a run folder from someone else
cannot run code here, and a tampered one is refused.

Every kind of run (`fit`, `finetune`) fills one `RunRecord`, and `write_run` writes its whole folder,
so the card, the extraction record (`extraction_record`, one key list) and the files cannot drift
apart between kinds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classify.calibration import Calibration
from classify.heads import Head, get_head
from classify.inputs import InputSpec, MetaEncoder, proba_views
from classify.ood import OOD_FILE, Ood
from classify.operating import OperatingPoint
from features.splits import TEST, UNUSED, read_split, split_digest
from features.rows import StoreRows
from features.store import FeatureStore

if TYPE_CHECKING:  # report.py draws with matplotlib, which loading or applying a run never needs
    from classify.report import ReportParts
    from extract.backbones import BackboneOptions

__all__ = [
    "CARD",
    "CARD_KEYS",
    "EXTRACTION_KEYS",
    "FAILED_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "HEAD_FOLDER",
    "SPLIT_FILE",
    "Run",
    "RunError",
    "RunRecord",
    "RunSplit",
    "extraction_record",
    "jsonable",
    "load_run",
    "predictions_csv",
    "read_card",
    "read_run_split",
    "recorded_options",
    "run_split",
    "save_run",
    "save_split",
    "weights_option",
    "write_json",
    "write_run",
    "write_text",
]

log = logging.getLogger("classify")

HEAD_FOLDER = "head"
CARD = "run.json"
SPLIT_FILE = "split.npz"
"""The split the run was fitted and tested with: every row it used, its fold (TEST for test rows) and
the SHA-256 of its image file, so that `evaluate` can tell which images the run has seen."""
CARD_KEYS: dict[str, type] = {
    "format": str,
    "head": str,
    "params": dict,
    "classes": list,
    "files": dict,
    "inputs": dict,
    "meta_encoder": dict,
    "extraction": dict,
    "split": str,
}
"""What a card must hold, and of which JSON type, before anything else of it is trusted."""
FORMAT = "skin-lesion-run"
FORMAT_VERSION = 1
EXTRACTION_KEYS = (
    "weights",
    "weights_sha256",
    "precision",
    "views",
    "runtime",
    "decode",
    "calibration",
    "pool",
    "input_size",
    "clip_embed",
    "license",
    "fingerprint",
    "identity",
)
"""Per backbone, what the card records of the extraction: everything `predict` needs to embed new images
the same way (`weights_option`, precision, views, runtime, decoder, calibration, and the backbone options
pool, input size and CLIP projection: None where the store has none; a decoder of None is Pillow's, from
before `--decode`) and the fingerprint and identity that `check_fingerprints` compares. One list for
every kind of run, so that no kind can drift."""
FAILED_FILE = "failed.csv"


class RunError(ValueError):
    """A run folder that cannot be loaded: missing, incomplete, or modified since it was written."""


def jsonable(value):
    """NaN and infinities as null (strict JSON), numpy scalars and arrays as Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data) -> None:
    """Atomically (temporary file, then rename): a concurrent reader never sees half a file."""
    write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Atomically; a failed write (a full disk) leaves neither a half file nor its temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Run:
    """A loaded run: its fitted head and how to build that head's inputs."""

    folder: Path
    card: dict
    head: Head
    inputs: InputSpec
    encoder: MetaEncoder

    @property
    def classes(self) -> list[str]:
        return list(self.card["classes"])

    @property
    def calibration(self) -> Calibration:
        """The calibration map fitted with the run (none for a run made before there was one)."""
        try:
            return Calibration.from_dict(self.card.get("calibration"))
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{self.folder / CARD}: its calibration cannot be read ({exc})") from None

    @property
    def operating_point(self) -> OperatingPoint | None:
        """The threshold the run decides its positive class at (None: it decides by the argmax)."""
        try:
            return OperatingPoint.from_dict(self.card.get("operating_point"))
        except (ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{self.folder / CARD}: its operating point cannot be read ({exc})") from None

    @property
    def ood(self) -> Ood | None:
        """The run's out-of-distribution description (None for a run without one: streamed embeddings,
        `finetune`, or made before there were any); its file was checked against the card's hash."""
        if OOD_FILE not in self.card["files"]:
            return None
        try:
            return Ood.load(self.folder / HEAD_FOLDER / OOD_FILE)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"{self.folder / HEAD_FOLDER / OOD_FILE}: cannot be read as data ({exc})") from None

    def proba(self, x: np.ndarray | StoreRows) -> np.ndarray:
        """The run's probabilities of inputs `x`: the head's, calibrated as the run was."""
        return self.calibration.apply(proba_views(self.head, x))

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Each row's decided class: at the operating point where the run has one, else the argmax."""
        point = self.operating_point
        if point is None:
            return np.array(self.classes, dtype=object)[np.asarray(proba).argmax(axis=1)]
        return point.decide(proba, self.classes)


def save_run(folder: Path, head: Head, card: dict, *, ood: Ood | None = None) -> None:
    """Write the head's files, `ood` (as ood.npz beside them, hashed with them) and the card (last, with
    the files' hashes)."""
    head_dir = folder / HEAD_FOLDER
    head_dir.mkdir(parents=True, exist_ok=True)
    files = list(head.save(head_dir))
    (head_dir / OOD_FILE).unlink(missing_ok=True)  # an earlier fit's, in a folder written again
    if ood is not None:
        ood.save(head_dir / OOD_FILE)
        files.append(OOD_FILE)
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **card,
        "head": head.name,
        "params": head.get_params(),
        "classes": [str(c) for c in head.classes_],
        "files": {name: _sha256(head_dir / name) for name in files},
    }
    write_json(folder / CARD, card)


def read_card(folder: Path) -> dict:
    """The run's card, checked: valid JSON, the keys a run needs, and head files named inside head/."""
    card_path = Path(folder) / CARD
    if not card_path.is_file():
        raise RunError(f"{folder}: not a finished run (no {CARD}); run `cli.py fit ... --out {folder}` first")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(
            f"{card_path}: not valid JSON ({exc}); the card was damaged or edited: restore it, or fit the run again"
        ) from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        format_ = card.get("format") if isinstance(card, dict) else None
        raise RunError(f"{card_path}: not a run card (format {format_!r})")
    for key, kind in CARD_KEYS.items():
        if not isinstance(card.get(key), kind):
            raise RunError(
                f"{card_path}: {key!r} is missing or not a JSON {kind.__name__}; the card was edited or "
                "damaged: restore it, or fit the run again"
            )
    for name in card["files"]:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise RunError(
                f"{card_path}: lists {name!r} as a head file; a run's files are plain names inside its "
                f"{HEAD_FOLDER}/ folder"
            )
    return card


def load_run(folder: str | Path) -> Run:
    """Load a run after checking every head file against the hash recorded when it was written."""
    folder = Path(folder)
    card = read_card(folder)
    head_dir = folder / HEAD_FOLDER
    for name, expected in card["files"].items():
        path = head_dir / name
        if not path.is_file():
            raise RunError(f"{path}: missing; the run folder is incomplete")
        if _sha256(path) != expected:
            raise RunError(
                f"{path}: its SHA-256 differs from the one recorded in {CARD} when the run was written; "
                f"the file was modified, so the run is refused"
            )
    head_cls = get_head(card["head"])
    try:
        head = head_cls.load(head_dir, card["params"], card["classes"])
        inputs, encoder = InputSpec.from_dict(card["inputs"]), MetaEncoder(card["meta_encoder"])
    except Exception as exc:  # a head file that is not the data it should be (e.g. a pickle with code)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunError(
            f"{head_dir}: the {card['head']} head cannot be read as data ({reason[:200]}); the run is refused"
        ) from None
    return Run(folder, card, head, inputs, encoder)


@dataclass
class RunSplit:
    """The rows a run used, by image: which were test rows, which it trained or was tuned on."""

    image_id: np.ndarray
    fold: np.ndarray
    sha256: np.ndarray

    @property
    def test_ids(self) -> np.ndarray:
        return self.image_id[self.fold == TEST]

    @property
    def seen(self) -> np.ndarray:
        """Rows the run trained or was tuned on (every fold of the study part)."""
        return self.fold >= 0


def save_split(folder: Path, ids, folds: np.ndarray, sha256) -> str:
    """Write RUN/split.npz (rows in the split only) and return its digest."""
    ids = np.asarray(ids, dtype=str)
    folds = np.asarray(folds, dtype=np.int8)
    keep = folds != UNUSED
    tmp = folder / f".{SPLIT_FILE}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            np.savez_compressed(
                handle, image_id=ids[keep], fold=folds[keep], sha256=np.asarray(sha256, dtype="S64")[keep]
            )
        os.replace(tmp, folder / SPLIT_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    return split_digest(ids[keep], folds[keep])


def read_run_split(folder: str | Path) -> RunSplit | None:
    """The split a run recorded (None for runs made before runs kept their split)."""
    path = Path(folder) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return RunSplit(z["image_id"].astype(str), z["fold"].astype(np.int8), z["sha256"].astype(str))
    except (OSError, ValueError, KeyError) as exc:
        raise RunError(f"{path}: cannot be read ({exc}); restore it, or fit the run again") from None


def run_split(run: Run) -> RunSplit:
    """The split the run used: its own record, or (runs made before runs kept it) the split stored in
    the run's store."""
    recorded = read_run_split(run.folder)
    if recorded is not None:
        return recorded
    path = Path(run.card["store"])
    store = FeatureStore(path) if path.is_file() else None
    stored = read_split(store, run.card["split"]) if store is not None else None
    if stored is None:
        raise RunError(
            f"{run.folder}: the run's split {run.card['split']} is recorded neither in the run nor in "
            f"{path}; fit the run again"
        )
    keep = stored != UNUSED
    return RunSplit(store.column("image_id")[keep], stored[keep], store.column("sha256")[keep])


def predictions_csv(
    ids: np.ndarray,
    proba: np.ndarray,
    classes: list[str],
    decisions: np.ndarray | None = None,
    failed: dict[str, str] | None = None,
    *,
    ood_score: np.ndarray | None = None,
    in_distribution: np.ndarray | None = None,
) -> str:
    """ISIC-style: `image` then one probability column per class; with `decisions`, `predicted` (the
    most probable class) and `decision` (the run's decision: at its operating point where it has one);
    with `ood_score` and `in_distribution`, those columns (the out-of-distribution score and whether it
    is within the run's threshold: true/false); with `failed`, an `error` column, blank for classified
    images, and a row with its reason for each image that could not be classified."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    errors = failed is not None
    decided = decisions is not None
    flagged = ood_score is not None and in_distribution is not None
    header = (
        ["image", *classes]
        + (["predicted", "decision"] if decided else [])
        + (["ood_score", "in_distribution"] if flagged else [])
        + (["error"] if errors else [])
    )
    writer.writerow(header)
    for k, (image_id, row) in enumerate(zip(ids, proba)):
        cells = [str(image_id), *(f"{p:.6f}" for p in row)]
        if decided:
            cells += [classes[int(np.argmax(row))], str(decisions[k])]
        if flagged:
            cells += [f"{ood_score[k]:.6g}", "true" if in_distribution[k] else "false"]
        writer.writerow(cells + ([""] if errors else []))
    blank = len(classes) + (2 if decided else 0) + (2 if flagged else 0)
    for image_id, reason in (failed or {}).items():
        writer.writerow([image_id, *([""] * blank), reason])
    return buffer.getvalue()


def weights_option(backbone: str, recorded: dict, run_folder: Path) -> str:
    """How to ask `extract` for the weights the run's store was made with. A weights file that has
    moved with its run folder (a fine-tuned backbone.pt) is found there; the fingerprint check after
    extraction proves it is the same file."""
    from extract.backbones import get_family  # torch: only `predict` embeds images (heads.py says why)

    if recorded["weights"] == "none":
        return "none"
    if recorded["weights"] == get_family(backbone).default_weights:
        return "default"
    for candidate in (Path(recorded["weights"]), Path(run_folder) / Path(recorded["weights"]).name):
        if candidate.is_file():
            return str(candidate)
    raise RunError(f"the run's {backbone} weights file {recorded['weights']} is not here; put it back there")


def recorded_options(recorded: dict) -> BackboneOptions:
    """The backbone options (pool, input size, CLIP projection) a card's extraction entry records; a
    store made before they existed has none: the defaults, which is what it was made with."""
    from extract.backbones import BackboneOptions  # torch: only `predict` embeds images (heads.py says why)

    return BackboneOptions(
        pool=recorded.get("pool") or "auto",
        input_size=int(recorded.get("input_size") or 0),
        clip_embed=recorded.get("clip_embed") or "pre",
    )


def extraction_record(store: FeatureStore, backbones: Iterable[str]) -> dict[str, dict]:
    """The card's `extraction` entry: EXTRACTION_KEYS of each backbone's attributes in `store` (None for
    one a store made by an older version lacks)."""
    return {b: {k: store.backbone_attrs(b).get(k) for k in EXTRACTION_KEYS} for b in backbones}


@dataclass(kw_only=True)
class RunRecord:
    """Everything a run folder holds, whichever command made it (`fit`, `finetune`): `write_run` writes
    it, the same files in the same formats for every kind."""

    head: Head
    """The final head; its `classes_` are the columns of every probability array below."""
    store: Path
    """The feature store the run's figures come from (`evaluate` scores it again)."""
    split: str
    """The split's name (`SplitSpec.name`)."""
    ids: np.ndarray
    folds: np.ndarray
    sha256: np.ndarray
    """Image id, fold (TEST, UNUSED, or a study fold) and image-file SHA-256 of the rows: RUN/split.npz."""
    inputs: InputSpec
    meta_encoder: dict
    """`MetaEncoder.columns` ({} without metadata)."""
    extraction: dict[str, dict]
    """`extraction_record(store, inputs.backbones)`."""
    positive: str | None
    majority: str
    config: dict
    """RUN/config.json: the command's options and what they resolved to."""
    metrics: dict
    """RUN/metrics.json: a part per scored set ("test", and "cv" or "validation")."""
    predictions: dict[str, tuple[np.ndarray, np.ndarray]]
    """Part name -> (image ids, probabilities): RUN/<part>_predictions.csv. "test" is required: the
    report's plots draw it."""
    test_labels: np.ndarray
    """The true labels of predictions["test"], row for row."""
    counts: dict[str, dict[str, int]]
    """Rows per class in the study and test parts (`split_counts`), for the report."""
    report: ReportParts
    """What this kind of run adds to the shared report (report.study_parts, report.training_parts)."""
    calibration: Calibration = field(default_factory=Calibration)
    """The map its probabilities (those of `predictions` included) were calibrated with."""
    operating_point: OperatingPoint | None = None
    """Where it decides its positive class (None: by the argmax)."""
    test_uncalibrated: np.ndarray | None = None
    """The head's own test probabilities, where `calibration` changed them (the report draws both)."""
    card_extra: dict = field(default_factory=dict)
    """The card's entries of this kind of run (fit: study; finetune: kind, init, unfreeze, best_epoch,
    decision); they may not replace an entry every run has."""
    extra_files: dict[str, Any] = field(default_factory=dict)
    """Further JSON files by name (fit: study.json; finetune: history.json)."""
    failed: dict[str, str] = field(default_factory=dict)
    """Images that could not be used and why: RUN/failed.csv when there are any."""
    ood: Ood | None = None
    """The out-of-distribution description of the study rows' embeddings (None: the run has none)."""


def write_run(folder: Path, record: RunRecord) -> None:
    """Write the whole run folder: split.npz, the head and its card, config.json, the extra JSON files,
    metrics.json, the prediction CSVs, failed.csv, and report.md with its plots."""
    from classify.report import write_run_report  # matplotlib only when a run is written

    folder = Path(folder)
    classes = [str(c) for c in record.head.classes_]
    _check_record(record, classes)
    folder.mkdir(parents=True, exist_ok=True)
    card = {
        "store": str(Path(record.store).resolve()),
        "split": record.split,
        "split_digest": save_split(folder, record.ids, record.folds, record.sha256),
        "inputs": record.inputs.as_dict(),
        "meta_encoder": record.meta_encoder,
        "extraction": record.extraction,
        "positive": record.positive,
        "majority": record.majority,
        "calibration": record.calibration.as_dict(),
        "operating_point": record.operating_point.as_dict() if record.operating_point else None,
    }
    save_run(folder, record.head, {**card, **record.card_extra}, ood=record.ood)
    write_json(folder / "config.json", record.config)
    for name, data in record.extra_files.items():
        write_json(folder / name, data)
    write_json(folder / "metrics.json", record.metrics)
    for part, (ids, proba) in record.predictions.items():
        decisions = _decisions(record, proba, classes)
        write_text(folder / f"{part}_predictions.csv", predictions_csv(ids, proba, classes, decisions))
    if record.failed:
        write_text(folder / FAILED_FILE, _failed_csv(record.failed))
        log.warning("%d images could not be used (listed in %s)", len(record.failed), folder / FAILED_FILE)
    write_run_report(
        folder,
        metrics=record.metrics,
        config=record.config,
        counts=record.counts,
        test_labels=np.asarray(record.test_labels),
        test_proba=record.predictions["test"][1],
        parts=record.report,
        extraction=record.extraction,
        test_uncalibrated=record.test_uncalibrated if record.calibration.method != "none" else None,
    )
    _write_html(folder, record, classes)


def _decisions(record: RunRecord, proba: np.ndarray, classes: list[str]) -> np.ndarray:
    """The run's decisions: at its operating point where it has one, else the most probable class."""
    if record.operating_point:
        return record.operating_point.decide(proba, classes)
    return np.array(classes, dtype=object)[np.asarray(proba).argmax(axis=1)]


def _write_html(folder: Path, record: RunRecord, classes: list[str]) -> None:
    """report.html: report.md with the error gallery of the test rows and the map of the run's store."""
    from classify.html import write_html_report
    from classify.visuals import gallery_section, map_column, map_section

    store = FeatureStore(record.store)
    ids, proba = record.predictions["test"]
    files = store.image_files()[store.rows_of(ids)]
    decisions = _decisions(record, proba, classes)
    subgroups = [c.strip() for c in str(record.config.get("subgroups") or "").split(",") if c.strip()]
    sections = [
        gallery_section(
            folder,
            ids=np.asarray(ids),
            files=files,
            labels=np.asarray(record.test_labels),
            proba=np.asarray(proba),
            classes=classes,
            decisions=decisions,
            positive=record.positive,
        ),
        map_section(
            Path(record.store),
            backbone=record.inputs.backbones[0],
            run_folder=folder,
            column=map_column(store, subgroups),
        ),
    ]
    write_html_report(folder, sections)


def _failed_csv(failed: dict[str, str]) -> str:
    """`image,reason`, a row per image; a reason with a comma is quoted, as CSV readers expect."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "reason"])
    writer.writerows(failed.items())
    return buffer.getvalue()


def _check_record(record: RunRecord, classes: list[str]) -> None:
    """A record that would write a run `load_run` or `predict` misreads is refused before any file."""
    reserved = set(CARD_KEYS) | {
        "format_version",
        "store",
        "split_digest",
        "positive",
        "majority",
        "calibration",
        "operating_point",
    }
    clash = sorted(reserved & set(record.card_extra))
    if clash:
        raise ValueError(f"card_extra would replace {', '.join(clash)}, which every run's card holds")
    if set(record.extraction) != set(record.inputs.backbones):
        raise ValueError(f"extraction record of {sorted(record.extraction)} for inputs {record.inputs.backbones}")
    for backbone, recorded in record.extraction.items():
        if tuple(recorded) != EXTRACTION_KEYS:
            raise ValueError(f"extraction record of {backbone}: {list(recorded)}, not EXTRACTION_KEYS")
    if "test" not in record.predictions:
        raise ValueError("predictions: a run needs its test predictions")
    for part, (ids, proba) in record.predictions.items():
        if np.shape(proba) != (len(ids), len(classes)):
            raise ValueError(f"{part} predictions: {np.shape(proba)} for {len(ids)} ids and classes {classes}")
    if len(record.test_labels) != len(record.predictions["test"][0]):
        raise ValueError("test_labels: not one per test prediction")
