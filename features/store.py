"""The feature store: one HDF5 file of samples, embeddings per backbone, provenance and failures.

Format 1 (see docs/feature-store.md). Writing is crash-safe in two layers:

* While extraction runs, each finished block of rows goes to its own small `.npz` file in the journal
  folder `<store>.partial/`, written to a temporary name and renamed. A process killed at any moment
  (kill -9 included) leaves only whole journal files behind. HDF5 itself is not safe here: a process
  killed while it holds an HDF5 file open for writing can leave it unreadable.
* When all rows are done, `assemble` writes the store to `<store>.tmp` in the same folder (starting
  from a copy of the existing store, if any) and renames it into place; only then is the journal
  removed. An interrupted assembly is simply redone from the journal.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

__all__ = [
    "OPEN_LICENSES",
    "license_caveat",
    "BackboneLayout",
    "CHUNK_BYTES",
    "Chunk",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureStore",
    "Journal",
    "SAMPLE_FIELDS",
    "STR",
    "Samples",
    "StoreError",
    "assemble",
    "describe_mismatch",
    "fingerprint",
    "journal_folder",
    "journal_store",
    "merge_samples",
    "stored_name",
    "read_failed",
    "read_samples",
    "tool_version",
    "write_arrays",
    "write_blocks",
]

FORMAT = "skin-lesion-features"
FORMAT_VERSION = 1
SAMPLE_FIELDS = ("image_id", "path", "label", "group", "sha256")
STR = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20
"""Target size of one HDF5 chunk of embeddings (rows are chunked together for fast row reads)."""
DTYPES = ("float32", "float16")
"""How embeddings may be stored; readers always hand out float32. float16 halves an archive's store
(1,000,000 x 1,024 is 2 GB instead of 4) at a relative rounding error of 5e-4."""


def stored_name(backbone: str) -> str:
    """A backbone's name as the store (and run cards, fingerprints) write it. HDF5 reads a `/` in a name
    as a boundary between groups, so the `/` of OpenCLIP's `<arch>/<pretrained>` and of a hub's
    ORG/REPO is written %2F (`open_clip:ViT-B-32%2Fopenai`); every look-up by name takes either
    spelling."""
    return backbone.replace("/", "%2F")


class StoreError(ValueError):
    """A store that cannot be used as asked: wrong format, missing backbone, fingerprint mismatch."""


def tool_version() -> str:
    try:
        return metadata.version("skinlesion")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def fingerprint(identity: dict) -> str:
    """Hash of everything that changes an embedding; stores with another one are never mixed."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- reading


OPEN_LICENSES = frozenset(
    {"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc-by-sa-4.0", "cc0-1.0", "unlicense"}
)
"""Licences (as the Hugging Face hub spells them) that allow commercial use: weights under any other
are flagged where an extraction is reported."""


def license_caveat(license: str) -> str | None:
    """Why weights under `license` need a look before they are used, or None for an open licence."""
    text = license.strip().lower()
    if text in OPEN_LICENSES:
        return None
    if text in ("", "unknown", "other"):
        return "their licence is unknown: check it before any use beyond research"
    if re.search(r"(^|[^a-z])nc([^a-z]|$)|non-?commercial|research", text):
        return f"they are licensed {license}, which forbids commercial use"
    return f"they are licensed {license}, not an open licence: check its terms before use"


def describe_mismatch(old: dict | str, new: dict | str, *, names: tuple[str, str] = ("old", "new")) -> str:
    """The settings in which two backbone identities (dicts, or their JSON as stored) differ, one
    `key: old value vs new value` each: the one wording of every "made with other settings" error."""
    old = json.loads(old or "{}") if isinstance(old, str) else old
    new = json.loads(new or "{}") if isinstance(new, str) else new
    differ = [
        f"{k}: {names[0]} {old.get(k)!r}, {names[1]} {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    return "; ".join(differ) or "the fingerprints differ"


@dataclass
class Samples:
    """The /samples table in memory, as strings; rows are in store order."""

    image_id: list[str] = field(default_factory=list)
    path: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    group: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    meta: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_id)


def merge_samples(old: Samples, new: Samples) -> Samples:
    """Rows of `old` in their order, then the ids only `new` has; `new` wins on everything but an
    empty sha256 (a row keeps the hash of the file it was embedded from until it is embedded again)."""
    columns = list(dict.fromkeys([*old.meta, *new.meta]))
    records: dict[str, dict[str, str]] = {}
    for table in (old, new):
        for row, image_id in enumerate(table.image_id):
            record = records.setdefault(image_id, {"sha256": ""})
            record.update({name: getattr(table, name)[row] for name in ("path", "label", "group")})
            record.update({f"meta/{c}": values[row] for c, values in table.meta.items()})
            record["sha256"] = table.sha256[row] or record["sha256"]
    merged = Samples(image_id=list(records))
    for name in ("path", "label", "group", "sha256"):
        setattr(merged, name, [record[name] for record in records.values()])
    merged.meta = {c: [record.get(f"meta/{c}", "") for record in records.values()] for c in columns}
    return merged


def _strings(ds: h5py.Dataset) -> list[str]:
    return list(ds.asstr()[()]) if ds.dtype.kind == "O" else [_meta_str(v) for v in ds[()]]


def _meta_str(value: float) -> str:
    return "" if np.isnan(value) else repr(float(value))


class FeatureStore:
    """Read access to a finished store; each call opens the file briefly (no handle is kept)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path}: no such feature store")
        with self._open() as f:
            if f.attrs.get("format") != FORMAT:
                raise StoreError(f"{self.path}: not a feature store (format attribute is {f.attrs.get('format')!r})")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise StoreError(f"{self.path}: store format {version}, this tool reads {FORMAT_VERSION}")

    def _open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open as HDF5 ({exc})") from None

    @property
    def attrs(self) -> dict:
        with self._open() as f:
            return dict(f.attrs)

    @property
    def backbones(self) -> list[str]:
        with self._open() as f:
            return sorted(f["embeddings"]) if "embeddings" in f else []

    def backbone_attrs(self, backbone: str) -> dict:
        with self._open() as f:
            return dict(self._group(f, backbone).attrs)

    def _group(self, f: h5py.File, backbone: str) -> h5py.Group:
        backbone = stored_name(backbone)
        if backbone not in f.get("embeddings", {}):
            known = ", ".join(sorted(f.get("embeddings", {}))) or "none"
            raise StoreError(f"{self.path}: no embeddings for backbone {backbone!r} (the store has: {known})")
        return f["embeddings"][backbone]

    def samples(self) -> Samples:
        with self._open() as f:
            return read_samples(f)

    def __len__(self) -> int:
        """Rows of the store, without reading them."""
        with self._open() as f:
            return len(f["samples/image_id"]) if "samples" in f else 0

    def column(self, name: str) -> np.ndarray:
        """One column of /samples (`label`, `group`, `image_id`, ..., or `meta/NAME`) as a compact
        array of strings: a large store's columns are read one at a time, not as a whole `Samples`."""
        with self._open() as f:
            if f"samples/{name}" not in f:
                raise StoreError(f"{self.path}: no column samples/{name}")
            values = _strings(f[f"samples/{name}"])
        return np.array(values, dtype=str) if values else np.zeros(0, dtype=str)

    def rows_of(self, image_ids) -> np.ndarray:
        """The store rows holding `image_ids`, in their order (KeyError for an id the store lacks)."""
        row_of = {image_id: row for row, image_id in enumerate(self.column("image_id"))}
        return np.array([row_of[i] for i in image_ids], dtype=np.int64)

    def pick_backbone(self, backbone: str | None) -> str:
        """The backbone named (StoreError naming the store's ones when it has no such), or the store's only
        one when none is named; a store of several needs a name (`--backbone`)."""
        known = self.backbones
        if not known:
            raise StoreError(f"{self.path}: the store holds no embeddings; run `extract` first")
        if backbone is None:
            if len(known) > 1:
                raise StoreError(f"{self.path} holds several backbones ({', '.join(known)}): name one with --backbone")
            return known[0]
        self.backbone_attrs(backbone)
        return backbone

    def image_files(self) -> np.ndarray:
        """Where each row's image file was read from: its path joined to the folder `extract` read the
        images from (the `data_root` attribute), as strings; the path as stored when there is none. The
        files may have moved since: callers check that they exist."""
        root = self.attrs.get("data_root")
        paths = self.column("path")
        if not root:
            return paths
        return np.array([str(Path(root) / p) if p else "" for p in paths], dtype=str)

    def meta_columns(self) -> list[str]:
        with self._open() as f:
            return list(f.get("samples/meta", {}))

    def embeddings(self, backbone: str, views: bool = False) -> np.ndarray:
        """(N, dim) embeddings, or (N, V, dim) test-time views with `views=True`; float32 always."""
        with self._open() as f:
            group = self._group(f, backbone)
            if views and "views" not in group:
                raise StoreError(f"{self.path}: backbone {backbone!r} was extracted without test-time views")
            return group["views" if views else "data"][()].astype(np.float32, copy=False)

    def dim(self, backbone: str) -> int:
        with self._open() as f:
            return int(self._group(f, backbone)["data"].shape[1])

    def views(self, backbone: str) -> int:
        """Test-time views stored per image (1: only the plain view)."""
        with self._open() as f:
            group = self._group(f, backbone)
            return int(group["views"].shape[1]) if "views" in group else 1

    def read_rows(self, backbones: Iterable[str], rows: np.ndarray, block_rows: int) -> Iterator[np.ndarray]:
        """float32 blocks of about `block_rows` rows: the `rows` (sorted store rows) of the backbones'
        embeddings side by side, in order. The file is read in windows of `block_rows` store rows, so
        memory stays near two blocks however scattered the rows are."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) > 1 and np.any(np.diff(rows) <= 0):
            raise ValueError("read_rows: rows must be sorted and unique")
        with self._open() as f:
            datasets = [self._group(f, b)["data"] for b in backbones]
            pending: list[np.ndarray] = []
            waiting = 0
            windows = np.unique(rows // block_rows)
            edges = np.searchsorted(rows, np.r_[windows, windows[-1] + 1] * block_rows) if len(rows) else []
            for k, window in enumerate(windows):
                mine = rows[edges[k] : edges[k + 1]]
                span = slice(int(mine[0]), int(mine[-1]) + 1)
                parts = [ds[span][mine - mine[0]].astype(np.float32, copy=False) for ds in datasets]
                pending.append(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
                waiting += len(mine)
                if waiting >= block_rows:
                    yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                    pending, waiting = [], 0
            if pending:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]

    def done(self, backbone: str) -> np.ndarray:
        with self._open() as f:
            return self._group(f, backbone)["done"][()]

    def failed(self) -> dict[str, str]:
        with self._open() as f:
            return read_failed(f)


def read_samples(f: h5py.File) -> Samples:
    if "samples" not in f:
        return Samples()
    group = f["samples"]
    samples = Samples(**{name: _strings(group[name]) for name in SAMPLE_FIELDS})
    samples.meta = {name: _strings(ds) for name, ds in group.get("meta", {}).items()}
    return samples


def read_failed(f: h5py.File) -> dict[str, str]:
    if "failed" not in f:
        return {}
    return dict(zip(_strings(f["failed/image_id"]), _strings(f["failed/reason"])))


# ----------------------------------------------------------------------------------------- journal


class Journal:
    """Finished rows of a running extraction, as atomically written `.npz` files in one folder."""

    _last_ns = 0
    """Time stamp in this process's last chunk name: names sort in write order even when the clock
    stands still between two writes, or steps back."""

    def __init__(self, folder: Path):
        self.folder = folder

    def start(self, fingerprints: dict[str, str], overwrite: bool) -> None:
        """Begin or resume; a journal made with other settings is an error unless `overwrite`."""
        plan = self.folder / "fingerprints.json"
        old = json.loads(plan.read_text()) if plan.is_file() else {}
        changed = sorted(b for b in fingerprints if b in old and old[b] != fingerprints[b])
        if changed and not overwrite:
            raise StoreError(
                f"{self.folder} holds an interrupted extraction of {', '.join(changed)} with other "
                f"settings (fingerprint {old[changed[0]]}, now {fingerprints[changed[0]]}); rerun it with "
                f"the same options to resume, or pass --overwrite to discard it"
            )
        if changed:
            shutil.rmtree(self.folder)
            old = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(plan, json.dumps({**old, **fingerprints}, indent=1).encode())

    def chunks(self) -> list[Path]:
        """The journal's files in name order: write order within each process (and the numbered names
        of older versions' journals first, so that their interrupted runs resume)."""
        return sorted(self.folder.glob("chunk-*.npz")) if self.folder.is_dir() else []

    def done_ids(self) -> dict[str, set[str]]:
        """Image ids already embedded per backbone (reads only the id arrays)."""
        done: dict[str, set[str]] = {}
        for path in self.chunks():
            with np.load(path, allow_pickle=False) as z:
                for k, backbone in enumerate(z["backbones"]):
                    done.setdefault(str(backbone), set()).update(z[f"ids_{k}"].tolist())
        return done

    def write(self, chunk: "Chunk") -> None:
        """Journal one block of work as a file of its own.

        The name (time, PID, random part) cannot collide with another process's or another Journal
        object's, even when two extractions write the same journal at once; picking the next number by
        listing the folder could, and one process then renamed the other's temporary file. The file
        appears only whole: written to a temporary name as unique as its own, synced, renamed. A write
        that fails (a full disk) removes its temporary file and re-raises; the chunks before it stay, so
        a rerun resumes from them."""
        if not chunk.ids and not chunk.failed:
            return
        arrays: dict[str, np.ndarray] = {
            "ids": np.array(chunk.ids, dtype=str),
            "sha256": np.array(chunk.sha256, dtype=str),
            "failed_ids": np.array(list(chunk.failed), dtype=str),
            "failed_reasons": np.array(list(chunk.failed.values()), dtype=str),
            "backbones": np.array(list(chunk.embeddings), dtype=str),
        }
        for k, (ids, data, views) in enumerate(chunk.embeddings.values()):
            arrays[f"ids_{k}"] = np.array(ids, dtype=str)
            arrays[f"data_{k}"] = data
            if views is not None:
                arrays[f"views_{k}"] = views
        stamp = Journal._last_ns = max(time.time_ns(), Journal._last_ns + 1)
        name = f"chunk-{stamp:020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path, tmp = self.folder / f"{name}.npz", self.folder / f"{name}.tmp"
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass  # the write's own error is the one to report
            raise

    def read(self) -> Iterator["Chunk"]:
        for path in self.chunks():
            with np.load(path, allow_pickle=False) as z:
                chunk = Chunk(ids=list(z["ids"]), sha256=list(z["sha256"]))
                chunk.failed = dict(zip(z["failed_ids"], z["failed_reasons"]))
                for k, backbone in enumerate(z["backbones"]):
                    views = z[f"views_{k}"] if f"views_{k}" in z.files else None
                    chunk.embeddings[str(backbone)] = (list(z[f"ids_{k}"]), z[f"data_{k}"], views)
                yield chunk

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Chunk:
    """One block of finished work: decoded images, their embeddings per backbone, and failures."""

    ids: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, tuple[list[str], np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    """backbone -> (image ids, (n, dim) data, (n, V, dim) views or None)."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- writing


@dataclass
class BackboneLayout:
    """What a backbone's datasets look like and the provenance attributes they carry."""

    name: str
    dim: int
    views: int
    attrs: dict
    dtype: str = "float32"
    """One of DTYPES."""


def journal_folder(store: Path) -> Path:
    return store.with_name(store.name + ".partial")


def journal_store(store: Path, journal: Journal, block: int = 4096) -> dict[str, int]:
    """Copy a finished store's embedded rows and failures into `journal`, `block` rows per chunk (so
    memory stays bounded); the next assembly writes them into its own store. Returns the rows copied
    per backbone.

    This is how the shards of a torchrun extraction, each a store of its own, become one store."""
    with h5py.File(store, "r") as f:
        samples = read_samples(f)
        failed = read_failed(f)
        groups = {name: f[f"embeddings/{name}"] for name in f.get("embeddings", {})}
        done = {name: g["done"][()] for name, g in groups.items()}
        copied = {name: 0 for name in groups}
        journal.write(Chunk(failed=failed))
        for start in range(0, len(samples), block):
            rows = np.array(
                [r for r in range(start, min(start + block, len(samples))) if samples.image_id[r] not in failed],
                dtype=np.int64,
            )
            if not len(rows):
                continue
            chunk = Chunk(ids=[samples.image_id[r] for r in rows], sha256=[samples.sha256[r] for r in rows])
            for name, group in groups.items():
                mine = rows[done[name][rows]]
                if len(mine):
                    span = slice(mine[0], mine[-1] + 1)  # one contiguous read, then the rows of it
                    views = group["views"][span][mine - mine[0]] if "views" in group else None
                    chunk.embeddings[name] = (
                        [samples.image_id[r] for r in mine],
                        group["data"][span][mine - mine[0]],
                        views,
                    )
                    copied[name] += len(mine)
            journal.write(chunk)
    return copied


def assemble(
    store: Path,
    samples: Samples,
    layouts: list[BackboneLayout],
    journal: Journal,
    root_attrs: dict,
    required: list[str],
) -> None:
    """Write the store with `samples` rows, the journal's embeddings and failures; rename into place.

    Every id in `required` must end up embedded by every backbone of `layouts`, or listed as failed.

    Rows of `samples` begin with the existing store's rows in their order. Backbones in the store but
    not in `layouts` are kept (grown with undone rows); a backbone whose fingerprint changed is
    replaced (the caller refuses that unless the user passed --overwrite).
    """
    tmp = store.with_name(store.name + ".tmp")
    _check_space(store, tmp, samples, layouts, journal)
    try:
        with h5py.File(tmp, "w") as f:
            failed = _copy_previous(store, f, layouts) if store.is_file() else {}
            _write_root(f, root_attrs)
            sha = dict(zip(samples.image_id, samples.sha256))
            row_of = {image_id: row for row, image_id in enumerate(samples.image_id)}
            groups = _prepare_embeddings(f, len(samples), layouts)
            for chunk in journal.read():
                sha.update(zip(chunk.ids, chunk.sha256))
                for image_id in chunk.ids:
                    failed.pop(image_id, None)
                failed.update(chunk.failed)
                for backbone, (ids, data, views) in chunk.embeddings.items():
                    if backbone not in groups:  # journalled, then dropped from the command
                        continue
                    rows = np.array([row_of[i] for i in ids], dtype=np.int64)
                    _write_rows(groups[backbone]["data"], rows, data)
                    if views is not None:
                        _write_rows(groups[backbone]["views"], rows, views)
                    _write_rows(groups[backbone]["done"], rows, np.ones(len(rows), dtype=bool))
            samples.sha256 = [sha.get(i, "") for i in samples.image_id]
            _write_samples(f, samples)
            _write_failed(f, {i: r for i, r in failed.items() if i in row_of})
            rows = np.array([row_of[i] for i in required if i not in failed], dtype=np.int64)
            for name, group in groups.items():  # every row filled (as dinov2 asserts it)
                missing = rows[~group["done"][()][rows]]
                if len(missing):
                    raise RuntimeError(
                        f"{name}: {len(missing)} rows were not embedded, e.g. {samples.image_id[missing[0]]}"
                    )
        os.replace(tmp, store)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    journal.remove()


def _check_space(store: Path, tmp: Path, samples: Samples, layouts: list[BackboneLayout], journal: Journal) -> None:
    """Refuse to assemble on a disk without room for the new store: HDF5 that runs out of space mid-write
    can leave its library in a state that crashes the process (seen: a segmentation fault after the
    error) instead of raising. The estimate: the old store (copied), the embeddings of every row, and
    the journal's size for the rest, with a margin."""
    rows = len(samples)
    embeddings = sum(rows * layout.dim * max(layout.views, 1) * np.dtype(layout.dtype).itemsize for layout in layouts)
    journalled = sum(path.stat().st_size for path in journal.chunks())
    old = store.stat().st_size if store.is_file() else 0
    needed = int(1.1 * (old + max(embeddings, journalled)) + (1 << 20) + 200 * rows)
    free = shutil.disk_usage(store.parent).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: assembling the store needs about "
            f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free",
            str(tmp),
        )


def _copy_previous(store: Path, f: h5py.File, layouts: list[BackboneLayout]) -> dict[str, str]:
    """Copy the existing store's attributes and groups into the new file; return its failures.

    A fresh file rather than the old one edited in place: HDF5 does not reclaim the space of deleted
    datasets, so a store rewritten in place would grow with every rerun. Embeddings made with another
    fingerprint are not copied (they are being replaced, as --overwrite asked).
    """
    fingerprints = {layout.name: layout.attrs["fingerprint"] for layout in layouts}
    with h5py.File(store, "r") as old:
        f.attrs.update(old.attrs)
        for key in old:
            if key not in ("samples", "failed", "embeddings"):
                old.copy(old[key], f, key)  # e.g. /splits, kept as they are
        embeddings = f.create_group("embeddings")
        for name, group in old.get("embeddings", {}).items():
            if fingerprints.get(name, group.attrs.get("fingerprint")) == group.attrs.get("fingerprint"):
                old.copy(group, embeddings, name)
        return read_failed(old)


def _write_root(f: h5py.File, attrs: dict) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    if "created" not in f.attrs:
        f.attrs["created"] = now
    f.attrs["updated"] = now
    f.attrs["tool_version"] = tool_version()
    for key, value in attrs.items():
        f.attrs[key] = value


def _prepare_embeddings(f: h5py.File, n: int, layouts: list[BackboneLayout]) -> dict:
    """Create or grow each backbone's datasets to `n` rows; return the groups of `layouts` by name."""
    root = f.require_group("embeddings")
    wanted = {layout.name: layout for layout in layouts}
    for name in root:
        group = root[name]
        for ds in group.values():
            ds.resize(n, axis=0)
    for name, layout in wanted.items():
        if name not in root:
            if layout.dtype not in DTYPES:
                raise StoreError(f"{name}: embeddings stored as {layout.dtype}? choose {', '.join(DTYPES)}")
            group = root.create_group(name)
            dtype = np.dtype(layout.dtype)
            rows = max(1, min(n, CHUNK_BYTES // (dtype.itemsize * layout.dim * layout.views)))
            group.create_dataset("data", (n, layout.dim), dtype, maxshape=(None, layout.dim), chunks=(rows, layout.dim))
            group.create_dataset("done", (n,), bool, maxshape=(None,), chunks=(max(1, min(n, 65536)),))
            if layout.views > 1:
                shape = (n, layout.views, layout.dim)
                group.create_dataset("views", shape, dtype, maxshape=(None,) + shape[1:], chunks=(rows,) + shape[1:])
        _update_attrs(root[name].attrs, layout.attrs)
    return {name: root[name] for name in wanted}


def _update_attrs(attrs: h5py.AttributeManager, values: dict) -> None:
    """Write only the attributes that change: rewriting an equal one in a copied group leaves the old
    value's space in HDF5's attribute heap, and a store must not grow from one rerun to the next."""
    for key, value in values.items():
        if key not in attrs or not np.array_equal(np.asarray(attrs[key]), np.asarray(value)):
            attrs[key] = value


def _write_rows(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """ds[rows] = values, one slice per run of consecutive rows (fast, and h5py needs sorted rows)."""
    order = np.argsort(rows, kind="stable")
    rows, values = rows[order], values[order]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        ds[rows[start] : rows[stop - 1] + 1] = values[start:stop]


def _write_samples(f: h5py.File, samples: Samples) -> None:
    group = f.create_group("samples")
    for name in SAMPLE_FIELDS:
        group.create_dataset(name, data=np.array(getattr(samples, name), dtype=object), dtype=STR)
    meta = group.create_group("meta")
    for name, values in samples.meta.items():
        try:  # a column of numbers is stored as float64, empty -> NaN; anything else as strings
            meta.create_dataset(name, data=np.array([float(v) if v else np.nan for v in values]))
        except ValueError:
            meta.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)


def _write_failed(f: h5py.File, failed: dict[str, str]) -> None:
    group = f.create_group("failed")
    group.create_dataset("image_id", data=np.array(list(failed), dtype=object), dtype=STR)
    group.create_dataset("reason", data=np.array(list(failed.values()), dtype=object), dtype=STR)


def write_arrays(store: Path, samples: Samples, embeddings: dict[str, tuple[np.ndarray, dict]]) -> None:
    """A store from arrays already in memory (synthetic stores for tests and benchmarks), written
    through the same journal and assembly as an extraction. `embeddings`: backbone -> ((N, dim) or
    (N, V, dim) array, provenance attributes, which must include a fingerprint)."""
    attrs = {name: a for name, (_, a) in embeddings.items()}
    write_blocks(store, samples, attrs, [(0, {name: values for name, (values, _) in embeddings.items()})])


def write_blocks(
    store: Path, samples: Samples, attrs: dict[str, dict], blocks: Iterable[tuple[int, dict[str, np.ndarray]]]
) -> None:
    """A store written block by block, so that one larger than memory can be made (bench/scale.py's
    synthetic archive). `blocks`: (first row, backbone -> (n, dim) or (n, V, dim) array); each array's
    dtype (float32 or float16) is how that backbone is stored. `attrs`: backbone -> provenance
    attributes, with a fingerprint."""
    store = Path(store)
    journal = Journal(journal_folder(store))
    journal.start({name: a["fingerprint"] for name, a in attrs.items()}, overwrite=True)
    layouts: dict[str, BackboneLayout] = {}
    for start, arrays in blocks:
        stop = start + len(next(iter(arrays.values())))
        ids = samples.image_id[start:stop]
        chunk = Chunk(ids=list(ids), sha256=list(samples.sha256[start:stop]))
        for name, values in arrays.items():
            views = values if values.ndim == 3 else values[:, None, :]
            layout = BackboneLayout(name, views.shape[2], views.shape[1], attrs[name], str(values.dtype))
            layouts.setdefault(name, layout)
            data = values if values.ndim == 2 else values.mean(axis=1, dtype=np.float32).astype(values.dtype)
            chunk.embeddings[name] = (list(ids), data, views if views.shape[1] > 1 else None)
        journal.write(chunk)
    assemble(store, samples, list(layouts.values()), journal, {}, [])
