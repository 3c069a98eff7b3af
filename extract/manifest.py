"""Data sets in: what images there are, where they lie, their labels, lesion groups and metadata.

`read_manifest` accepts a folder with one subfolder per class, a CSV manifest (columns named as in
`COLUMNS`), the official `HAM10000_metadata.csv` (a CSV manifest by those names) or an ISIC one-hot
ground-truth CSV (`image,MEL,NV,...`). Mistakes in the manifest itself (no image column, duplicate ids,
a missing --images folder) are errors before any work starts; a missing image file is not: it fails at
load time and is listed with the other unreadable images.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from extract.images import IMAGE_SUFFIXES
from features.store import Samples

__all__ = [
    "COLUMNS",
    "READERS",
    "Manifest",
    "ManifestError",
    "read_csv",
    "read_folder",
    "read_manifest",
    "read_paths",
]

log = logging.getLogger("extract")

COLUMNS: dict[str, tuple[str, ...]] = {
    "file": ("path", "image", "image_id", "image_name", "filename", "file"),
    "image_id": ("image_id", "image", "image_name"),
    "label": ("label", "dx", "diagnosis"),
    "group": ("group", "lesion_id", "patient_id"),
}
"""Accepted CSV column names per role, in order of preference; other columns become metadata."""


class ManifestError(ValueError):
    """A data set description that cannot be used; raised before any image is processed."""


@dataclass
class Manifest(Samples):
    """The rows of a data set (as the store's /samples table, files not yet hashed) and their origin."""

    source: str = ""
    kind: str = ""
    root: Path = Path(".")
    """Folder that `path` entries are relative to (the data root recorded in the store)."""

    def file(self, row: int) -> Path:
        return self.root / self.path[row]

    def take(self, rows) -> "Manifest":
        """Only these rows, in this order (a shard of the data set), with the same origin."""
        pick = lambda values: [values[r] for r in rows]  # noqa: E731
        return replace(
            self,
            image_id=pick(self.image_id),
            path=pick(self.path),
            label=pick(self.label),
            group=pick(self.group),
            sha256=pick(self.sha256),
            meta={c: pick(v) for c, v in self.meta.items()},
        )

    def check(self) -> "Manifest":
        if not self.image_id:
            raise ManifestError(f"{self.source}: no images found")
        counts = Counter(self.image_id)
        duplicates = [image_id for image_id, n in counts.items() if n > 1]
        if duplicates:
            lines = [
                f"{image_id} (rows {', '.join(str(i + 1) for i, x in enumerate(self.image_id) if x == image_id)})"
                for image_id in duplicates[:5]
            ]
            raise ManifestError(
                f"{self.source}: {len(duplicates)} duplicate image ids: {'; '.join(lines)}"
                + (" ..." if len(duplicates) > 5 else "")
            )
        self.group = [g or i for g, i in zip(self.group, self.image_id)]
        self.sha256 = [""] * len(self)  # hashed when the images are read
        return self


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _strip_suffix(name: str) -> str:
    return os.path.splitext(name)[0] if _is_image(name) else name


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def read_folder(folder: Path, images: Path | None) -> Manifest:
    """One subfolder per class; images directly in the folder are unlabelled."""
    files: list[tuple[Path, str]] = []
    skipped: Counter = Counter()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        here = Path(dirpath)
        label = "" if here == folder else here.relative_to(folder).parts[0]
        files += [(here / name, label) for name in sorted(filenames) if _is_image(name)]
        skipped.update(os.path.splitext(name)[1].lower() or name for name in filenames if not _is_image(name))
    if skipped:
        log.warning(
            "%s: %d files skipped, not in a format read here (%s; read: %s)",
            folder,
            sum(skipped.values()),
            ", ".join(f"{k} {n}" for k, n in skipped.most_common(5)),
            ", ".join(IMAGE_SUFFIXES),
        )
    relative = [_relative(path, folder) for path, _ in files]
    stems = [path.stem for path, _ in files]
    unique = len(set(stems)) == len(stems)  # same file name in two class folders: ids keep the folder
    ids = stems if unique else [os.path.splitext(rel)[0] for rel in relative]
    return Manifest(
        source=str(folder),
        kind="folder",
        root=folder,
        image_id=ids,
        path=relative,
        label=[label for _, label in files],
        group=list(ids),
    )


class _Resolver:
    """Finds the file of a CSV entry, and never a different file of the same name.

    An entry with a folder in it (`images/ISIC_1.jpg`, or an absolute path) is a path: relative to the
    root and nowhere else, so a missing file is a missing file (with the root one folder too high, a
    search by name would quietly take images of another data set). A bare name (`ISIC_1`,
    `ISIC_1.jpg`) is an id: tried directly under the root (with each image suffix when it has none),
    then searched for anywhere under it (HAM10000 ships its images in two folders). An id that names
    more than one file is ambiguous: collected in `ambiguous`, which the reader turns into an error."""

    def __init__(self, root: Path):
        self.root = root
        self._index: dict[str, list[Path]] | None = None
        self.ambiguous: dict[str, list[Path]] = {}

    def __call__(self, value: str) -> Path:
        if os.path.isabs(value) or "/" in value or os.sep in value:
            return Path(value) if os.path.isabs(value) else self.root / value
        if (self.root / value).is_file():
            return self.root / value
        if not _is_image(value):
            direct = _distinct(self.root / f"{value}{suffix}" for suffix in _ALL_SUFFIXES)
            if direct:
                return self._one(value, direct)
        found = self.index().get(_strip_suffix(value), [])
        if _is_image(value):
            found = [f for f in found if f.name.lower() == value.lower()]
        if found:
            return self._one(value, found)
        return self.root / (value if _is_image(value) else f"{value}{IMAGE_SUFFIXES[0]}")  # missing: fails later

    def _one(self, value: str, files: list[Path]) -> Path:
        if len(files) > 1:
            self.ambiguous[value] = files
        return files[0]

    def index(self) -> dict[str, list[Path]]:
        """Images anywhere under the root by stem."""
        if self._index is None:
            self._index = {}
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for name in sorted(filenames):
                    if _is_image(name):
                        self._index.setdefault(os.path.splitext(name)[0], []).append(Path(dirpath) / name)
        return self._index


_ALL_SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)))


def _distinct(paths) -> list[Path]:
    """The paths that are files, each file once (x.jpg and x.JPG are one file where case does not count)."""
    seen, files = set(), []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.is_file() and (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            files.append(path)
    return files


def _pick(header: list[str], role: str) -> str | None:
    lowered = {name.strip().lower(): name for name in header}
    return next((lowered[c] for c in COLUMNS[role] if c in lowered), None)


def _one_hot_columns(header: list[str], rows: list[dict[str, str]], file_col: str) -> list[str] | None:
    """The class columns of an ISIC ground-truth CSV (`image,MEL,NV,...`: one 1 per row), else None."""
    classes = [c for c in header if c != file_col]
    if file_col.lower() != "image" or len(classes) < 2 or not rows:
        return None
    for row in rows:
        try:
            values = [float(row[c]) for c in classes]
        except (TypeError, ValueError):
            return None
        if sorted(values) != [0.0] * (len(values) - 1) + [1.0]:
            return None
    return classes


def read_csv(path: Path, images: Path | None) -> Manifest:
    """A CSV manifest, HAM10000_metadata.csv or an ISIC one-hot ground truth."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = [h for h in (reader.fieldnames or [])]
        rows = list(reader)
    file_col = _pick(header, "file")
    if file_col is None:
        raise ManifestError(
            f"{path}: no image column; expected one of {', '.join(COLUMNS['file'])} "
            f"(found: {', '.join(header) or 'nothing'})"
        )
    root = images if images is not None else path.parent
    resolve = _Resolver(root)
    id_col = _pick(header, "image_id") or file_col
    one_hot = _one_hot_columns(header, rows, file_col)
    label_col = None if one_hot else _pick(header, "label")
    group_col = _pick(header, "group")
    used = {file_col, id_col, label_col, group_col, *(one_hot or [])}
    manifest = Manifest(source=str(path), kind="isic-one-hot" if one_hot else "csv", root=root)
    manifest.meta = {c: [] for c in header if c not in used}
    for line, row in enumerate(rows, start=2):
        value = (row.get(file_col) or "").strip()
        if not value:
            raise ManifestError(f"{path}, line {line}: empty {file_col!r}")
        manifest.image_id.append(_strip_suffix(Path((row.get(id_col) or value).strip()).name))
        manifest.path.append(_relative(resolve(value), root))
        if one_hot:
            manifest.label.append(next(c for c in one_hot if float(row[c]) == 1.0))
        else:
            manifest.label.append((row.get(label_col) or "").strip() if label_col else "")
        manifest.group.append((row.get(group_col) or "").strip() if group_col else "")
        for column, values in manifest.meta.items():
            values.append((row.get(column) or "").strip())
    if resolve.ambiguous:
        listed = "; ".join(
            f"{value} matches {', '.join(_relative(f, root) for f in files)}"
            for value, files in list(resolve.ambiguous.items())[:3]
        )
        raise ManifestError(
            f"{path}: {len(resolve.ambiguous)} image ids match more than one file under {root} ({listed}"
            f"{' ...' if len(resolve.ambiguous) > 3 else ''}); give each file's path relative to that folder "
            "in the CSV, or point --images at the folder that holds only this data set"
        )
    return manifest


READERS: list[tuple[Callable[[Path], bool], Callable[[Path, Path | None], Manifest]]] = [
    (Path.is_dir, read_folder),
    (Path.is_file, read_csv),
]
"""How each kind of --data is recognised and read, first match wins."""


def read_paths(paths: list[str | Path], root: str | Path | None = None) -> tuple[Manifest, dict[str, str]]:
    """Images named one by one, folders of them (searched recursively) or a single manifest CSV (its paths
    relative to `root`, else to its folder), as for `cli.py predict`. Returns the rows and the inputs that
    hold no image at all (a folder without images), with the reason. A path that does not exist becomes a
    row that fails as a missing file, so that every input is accounted for."""
    if len(paths) == 1 and Path(paths[0]).is_file() and str(paths[0]).lower().endswith(".csv"):
        return read_manifest(paths[0], root), {}
    here = Path.cwd()
    manifest = Manifest(source=", ".join(str(p) for p in paths), kind="paths", root=here)
    empty: dict[str, str] = {}
    for given in map(Path, paths):
        if given.is_dir():
            folder = read_folder(given, None)
            if not folder.path:
                empty[str(given)] = f"a folder with no images ({', '.join(IMAGE_SUFFIXES)})"
            files = [given / p for p in folder.path]
        else:
            files = [given]
        for file in files:
            manifest.image_id.append(_strip_suffix(file.name))
            manifest.path.append(_relative(file.resolve(), here))
            manifest.label.append("")
            manifest.group.append("")
    return (manifest.check() if manifest.image_id else manifest), empty


def read_manifest(data: str | Path, images: str | Path | None = None) -> Manifest:
    """Read --data (with --images for CSVs); every manifest error is raised here, before any work."""
    data = Path(data)
    images = Path(images) if images else None
    if images is not None and not images.is_dir():
        raise ManifestError(f"--images {images}: no such folder")
    for accepts, reader in READERS:
        if accepts(data):
            return reader(data, images).check()
    raise ManifestError(f"--data {data}: no such file or folder")
