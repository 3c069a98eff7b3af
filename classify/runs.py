"""Run folders: the fitted head and everything needed to apply it again, saved safely and verified.

`run.json` is the run's card: head name and parameters, classes, the inputs (backbones, views,
metadata encoder), the split it was tested on, and per backbone the extraction identity (weights,
precision, views, fingerprint) that `predict` must reproduce. It also records the SHA-256 of each head
file. Loading checks those hashes before reading anything, and every head format holds data only
(npz without pickle, tensors with weights_only, XGBoost UBJSON), so a run folder from someone else
cannot run code here, and a tampered one is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classify.heads import Head, get_head
from classify.inputs import InputSpec, MetaEncoder

HEAD_FOLDER = "head"
CARD = "run.json"
FORMAT = "skin-lesion-run"
FORMAT_VERSION = 1


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def save_run(folder: Path, head: Head, card: dict) -> None:
    """Write the head's files and the card (last, with the files' hashes)."""
    head_dir = folder / HEAD_FOLDER
    head_dir.mkdir(parents=True, exist_ok=True)
    files = head.save(head_dir)
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
    card_path = Path(folder) / CARD
    if not card_path.is_file():
        raise RunError(f"{folder}: not a finished run (no {CARD}); run `cli.py fit ... --out {folder}` first")
    card = json.loads(card_path.read_text())
    if card.get("format") != FORMAT:
        raise RunError(f"{card_path}: not a run card (format {card.get('format')!r})")
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
    head = get_head(card["head"]).load(head_dir, card["params"], card["classes"])
    return Run(folder, card, head, InputSpec.from_dict(card["inputs"]), MetaEncoder(card["meta_encoder"]))
