"""Data sets in: what images there are, where they lie, their labels, lesion groups and metadata.

`read_manifest` accepts a folder with one subfolder per class, a CSV manifest (columns named as in
`COLUMNS`), the official `HAM10000_metadata.csv` (a CSV manifest by those names), an ISIC one-hot
ground-truth CSV (`image,MEL,NV,...`, joined with the ISIC 2019 metadata CSV lying next to it) and the
published CSVs of the field's data sets as they are downloaded (`LAYOUTS`: ISIC 2020, PAD-UFES-20,
Fitzpatrick17k, DDI), each recognised by its columns. Whatever the source, the rows come out in common
names: `group` (lesion or patient) and the metadata columns `fitzpatrick`, `age`, `sex`, `site`, so that
subgroup analyses and splits read one set like another. Mistakes in the manifest itself (no image column, duplicate ids,
a missing --images folder) are errors before any work starts; a missing image file is not: it fails at
load time and is listed with the other unreadable images.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from extract.images import IMAGE_SUFFIXES
from features.store import Samples

__all__ = [
    "COLUMNS",
    "DDI",
    "FITZPATRICK17K",
    "ISIC_2019_METADATA",
    "ISIC_2020",
    "LAYOUTS",
    "PAD_UFES_20",
    "READERS",
    "SEX",
    "SIDECARS",
    "SKIN_TYPE",
    "Layout",
    "Manifest",
    "ManifestError",
    "Recode",
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


# ------------------------------------------------------------------------------ published layouts


@dataclass(frozen=True)
class Recode:
    """Published values of one column rewritten to common ones (keys lower-case: matching ignores case).

    `closed`: every non-blank value must be a key, else the row is an error; for codes whose meaning is
    fixed (a label of 1/0, True/False), where an unknown value is a broken file and not a new class.
    An open recode rewrites the values it knows and keeps the rest as given."""

    values: Mapping[str, str]
    closed: bool = False

    def __call__(self, value: str, *, where: str, column: str) -> str:
        if not value:
            return value
        known = self.values.get(value.lower())
        if known is not None:
            return known
        if self.closed:
            raise ManifestError(
                f"{where}: {column} {value!r} is not one of {', '.join(self.values)}; correct the row "
                f"(or rename the column to read the file as a plain CSV manifest)"
            )
        return value


SKIN_TYPE = Recode({"-1": "", **{f"{t}{s}": str(t) for t in range(1, 7) for s in ("", ".0")}})
"""Fitzpatrick skin type as a digit 1-6 and blank when unknown: Fitzpatrick17k writes unknown as -1 (as a
number it would sit below type I in any analysis), PAD-UFES-20 writes types as floats (`3.0`)."""

SEX = Recode({"female": "female", "male": "male"})
"""Sex lower-case as HAM10000 and ISIC write it (PAD-UFES-20 writes FEMALE/MALE): one subgroup per sex
across data sets."""


@dataclass(frozen=True)
class Layout:
    """How one published CSV maps onto a manifest: which of its columns is the image file, the label and
    the group, which are renamed to the common metadata names, and which values are rewritten.

    Column names are as published and matched ignoring case. A named column that the file lacks reads as
    blank (so ISIC 2020's test.csv, without `target`, reads as unlabelled); an unnamed group is the image
    itself. Columns not named here are kept as metadata under their own names."""

    name: str
    """What the manifest's `kind` says (the extract log prints it)."""
    recognise: tuple[str, ...] = ()
    """Columns that must all be present for a file to be read this way."""
    file: str = ""
    image_id: str | None = None
    """Column of the image id, else the file name without its suffix."""
    label: str | None = None
    one_hot: tuple[str, ...] = ()
    """Class columns of a one-hot ground truth: the label is the name of the column holding the 1."""
    group: str | None = None
    meta: Mapping[str, str] = field(default_factory=dict)
    """Common metadata name -> published column."""
    recode: Mapping[str, Recode] = field(default_factory=dict)
    """Published column -> how its values are rewritten."""

    def matches(self, header: Sequence[str]) -> bool:
        names = {h.strip().lower() for h in header}
        return bool(self.recognise) and all(c.lower() in names for c in self.recognise)


ISIC_2020 = Layout(
    name="ISIC 2020",
    recognise=("image_name", "patient_id", "anatom_site_general_challenge"),
    file="image_name",
    label="target",
    group="patient_id",
    meta={"age": "age_approx", "site": "anatom_site_general_challenge", "sex": "sex"},
    recode={"target": Recode({"1": "malignant", "0": "benign"}, closed=True), "sex": SEX},
)
"""ISIC 2020 `train.csv` (and `test.csv`, unlabelled). The label is `target`, the column the challenge
scores, written malignant/benign (the words of its `benign_malignant` column and of DDI's label, so that
the sets share a label vocabulary); `diagnosis` and `benign_malignant` stay metadata. Grouped by patient:
the set has up to ~100 images per patient, and a patient's other moles leak into a test split."""

PAD_UFES_20 = Layout(
    name="PAD-UFES-20",
    recognise=("img_id", "patient_id", "lesion_id", "diagnostic", "fitspatrick"),
    file="img_id",
    label="diagnostic",
    group="patient_id",
    meta={"fitzpatrick": "fitspatrick", "age": "age", "sex": "gender", "site": "region"},
    recode={"fitspatrick": SKIN_TYPE, "gender": SEX},
)
"""PAD-UFES-20 `metadata.csv` (smartphone photographs; images found by name anywhere under the data
folder: `images/` or the published `imgs_part_1..3/`). Labels as given (ACK, BCC, MEL, NEV, SCC, SEK),
as every reader here stores labels. Grouped by patient, not lesion: a patient's several lesions share skin,
age and camera, so a lesion split would still leak; `lesion_id` stays metadata. `fitspatrick` (their
spelling) becomes `fitzpatrick`."""

FITZPATRICK17K = Layout(
    name="Fitzpatrick17k",
    recognise=("md5hash", "fitzpatrick_scale", "label"),
    file="md5hash",
    label="label",
    meta={"fitzpatrick": "fitzpatrick_scale"},
    recode={"fitzpatrick_scale": SKIN_TYPE, "fitzpatrick_centaur": SKIN_TYPE},
)
"""Fitzpatrick17k `fitzpatrick17k.csv` (images named `<md5hash>.jpg`). The label is `label`, the 114
conditions as published; `nine_partition_label` and `three_partition_label` stay metadata, to train on
instead by renaming. Each image is its own group: no patient ids are published."""

DDI = Layout(
    name="DDI",
    recognise=("ddi_file", "skin_tone", "malignant"),
    file="DDI_file",
    label="malignant",
    meta={"fitzpatrick": "skin_tone"},
    recode={"malignant": Recode({"true": "malignant", "false": "benign"}, closed=True)},
)
"""Diverse Dermatology Images `ddi_metadata.csv`. The label is `malignant` written malignant/benign;
`disease` stays metadata. `skin_tone` is published in three bands and kept as they are: 12 (Fitzpatrick
I-II), 34 (III-IV), 56 (V-VI), so the `fitzpatrick` of DDI rows is a band, never a single type. Each image
is its own group: no patient ids are published."""

LAYOUTS: tuple[Layout, ...] = (ISIC_2020, PAD_UFES_20, FITZPATRICK17K, DDI)
"""Published CSVs recognised by their columns, first match wins; anything else is a CSV manifest."""

ISIC_2019_METADATA = Layout(
    name="ISIC 2019 metadata",
    recognise=("image", "age_approx", "anatom_site_general", "sex"),
    file="image",
    group="lesion_id",
    meta={"age": "age_approx", "site": "anatom_site_general", "sex": "sex"},
    recode={"sex": SEX},
)
"""ISIC 2019 `ISIC_2019_Training_Metadata.csv` (`lesion_id` blank for many images: each its own group;
the test set's metadata has no `lesion_id` at all). Read only as the sidecar of a one-hot ground truth,
never as --data on its own: it has no labels, and a manifest of one's own with these columns plus `label`
must not lose them."""

SIDECARS: tuple[Layout, ...] = (ISIC_2019_METADATA,)
"""Metadata CSVs joined, by image id, to a one-hot ground truth lying in the same folder: ISIC publishes
labels and metadata as two files."""


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


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        return header, list(reader)


def _read_header(path: Path) -> list[str]:
    """The first row of a CSV, or nothing for a file that is not one (a sibling looked at in passing)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _plain_layout(path: Path, header: list[str], rows: list[dict[str, str]]) -> Layout:
    """A CSV manifest by the names in `COLUMNS`, or an ISIC one-hot ground truth."""
    file_col = _pick(header, "file")
    if file_col is None:
        raise ManifestError(
            f"{path}: no image column; expected one of {', '.join(COLUMNS['file'])} "
            f"(found: {', '.join(header) or 'nothing'})"
        )
    one_hot = _one_hot_columns(header, rows, file_col)
    return Layout(
        name="isic-one-hot" if one_hot else "csv",
        file=file_col,
        image_id=_pick(header, "image_id"),
        label=None if one_hot else _pick(header, "label"),
        one_hot=tuple(one_hot or ()),
        group=_pick(header, "group"),
    )


def _parse(path: Path, header: list[str], rows: list[dict[str, str]], layout: Layout) -> Manifest:
    """The rows as `layout` reads them, with `path` holding each row's file entry as written (not yet
    looked up under the data root)."""
    actual = {h.strip().lower(): h for h in header}
    find = lambda name: actual.get(name.strip().lower()) if name else None  # noqa: E731
    file_col = find(layout.file)
    id_col = find(layout.image_id) or file_col
    label_col, group_col = find(layout.label), find(layout.group)
    renamed = {find(column): name for name, column in layout.meta.items() if find(column)}
    recode = {find(column): r for column, r in layout.recode.items() if find(column)}
    used = {file_col, id_col, label_col, group_col, *layout.one_hot}
    taken = set(renamed.values())
    meta = {  # a column named like a common name that another column takes is kept as `<name> (published)`
        column: renamed.get(column) or (f"{column} (published)" if column in taken else column)
        for column in header
        if column not in used
    }
    manifest = Manifest(source=str(path), kind=layout.name, meta={name: [] for name in meta.values()})
    for line, row in enumerate(rows, start=2):

        def value(column: str | None) -> str:
            text = (row.get(column) or "").strip() if column else ""
            rewrite = recode.get(column)
            return rewrite(text, where=f"{path}, line {line}", column=column) if rewrite else text

        entry = value(file_col)
        if not entry:
            raise ManifestError(f"{path}, line {line}: empty {file_col!r}")
        manifest.image_id.append(_strip_suffix(Path(value(id_col) or entry).name))
        manifest.path.append(entry)
        if layout.one_hot:
            manifest.label.append(next(c for c in layout.one_hot if float(row[c]) == 1.0))
        else:
            manifest.label.append(value(label_col))
        manifest.group.append(value(group_col))
        for column, name in meta.items():
            manifest.meta[name].append(value(column))
    return manifest


def _locate(manifest: Manifest, path: Path, root: Path) -> Manifest:
    """Each row's file entry looked up under `root` (see `_Resolver`); ambiguous names are an error."""
    resolve = _Resolver(root)
    manifest.root = root
    manifest.path = [_relative(resolve(entry), root) for entry in manifest.path]
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


def _join_sidecar(manifest: Manifest, path: Path) -> Manifest:
    """Groups and metadata of a one-hot ground truth from the first CSV next to it that is a sidecar
    (`SIDECARS`) and holds any of its image ids; rows it lacks keep blanks (their group: the image)."""
    for sibling in sorted(path.parent.glob("*.csv")):
        header = _read_header(sibling) if sibling != path else []
        sidecar = next((layout for layout in SIDECARS if layout.matches(header)), None)
        if sidecar is None:
            continue
        extra = _parse(sibling, *_read_table(sibling), sidecar)
        at: dict[str, int] = {}
        for row, image_id in enumerate(extra.image_id):
            at.setdefault(image_id, row)
        rows = [at.get(image_id) for image_id in manifest.image_id]
        if all(row is None for row in rows):
            continue
        take = lambda values: [values[r] if r is not None else "" for r in rows]  # noqa: E731
        manifest.group = [g or joined for g, joined in zip(manifest.group, take(extra.group))]
        manifest.meta.update({name: take(values) for name, values in extra.meta.items()})
        manifest.kind = f"{manifest.kind} + {sidecar.name} ({sibling.name})"
        missing = rows.count(None)
        if missing:
            log.warning("%s: %d of %d images have no row in %s", path, missing, len(rows), sibling)
        return manifest
    return manifest


def read_csv(path: Path, images: Path | None) -> Manifest:
    """A published data set's CSV (`LAYOUTS`), else a CSV manifest, HAM10000_metadata.csv or an ISIC
    one-hot ground truth (with its sidecar metadata)."""
    header, rows = _read_table(path)
    layout = next((layout for layout in LAYOUTS if layout.matches(header)), None) or _plain_layout(path, header, rows)
    manifest = _parse(path, header, rows, layout)
    if layout.one_hot:
        manifest = _join_sidecar(manifest, path)
    return _locate(manifest, path, images if images is not None else path.parent)


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
