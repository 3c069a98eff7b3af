"""Backbones compiled ahead of time and cached on disk, so that compiling is paid once per machine.

`torch.compile` compiles in every process, even with inductor's caches warm (tracing and guards are
redone), and on a CPU that costs as much as embedding a small data set (docs/results.md, measured by
bench/extract.py). AOTInductor instead exports the forward pass once, compiles it to a shared library
with the weights frozen in (BN folded, oneDNN pre-packed: the same kernels as `torch.compile` with
freezing), and writes one `.pt2` package, which a later run only has to load. The OpenVINO runtime
(extract/runtimes.py) caches its converted model (IR) here the same way.

A package is only valid for exactly what it was compiled from, so its name is a hash of all of it:
the backbone's identity (weights by content), precision, batch shape, device kind and CPU instruction
set or GPU model, and the torch version. The cache lives in `$SKINLESION_CACHE/compiled` (default
`~/.cache/skinlesion/compiled`) and keeps the most recently used packages within CACHE_LIMIT_BYTES.

That folder may hold other files too (a user's, another tool's), so the cache touches only what it
wrote itself: every entry it writes gets a marker beside it, `<entry name>.skinlesion.json`, holding
the SHA-256 and size of the entry's bytes (see `record`). Eviction considers marked entries only, and
a package (native code) is loaded only while its bytes still hash to what its marker recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "CACHE_ENV",
    "CACHE_LIMIT_BYTES",
    "FORMAT",
    "MARKER_FORMAT",
    "MARKER_SUFFIX",
    "SUFFIX",
    "cache_dir",
    "cache_root",
    "cached",
    "content_digest",
    "evict",
    "hardware",
    "integrity_problem",
    "is_ours",
    "load_or_compile",
    "load_or_convert",
    "marker_path",
    "package_path",
    "record",
    "remove",
    "touch",
]

log = logging.getLogger("extract")

CACHE_ENV = "SKINLESION_CACHE"
CACHE_LIMIT_BYTES = 4 << 30
"""Least recently used models beyond this are deleted. An entry holds its backbone's weights (an
OpenVINO model in fp32, a torch package in its precision), so this keeps several entries of each seed
backbone, even vgg11's."""
FORMAT = 2
"""Bump to orphan every cached package (when what goes into one changes). 2: entries carry a marker;
the unmarked packages of format 1 get other names, so they are never mistaken for entries of this
cache, which leaves them alone (not provably its own) and says so in the log when it evicts."""
MARKER_SUFFIX = ".skinlesion.json"
"""Appended to an entry's name to name its marker: the record that this cache wrote the entry."""
MARKER_FORMAT = 1
"""The version of the marker's content: {"format": 1, "sha256": hex digest, "bytes": size, "entry": name}."""


def cache_root() -> Path:
    """The project's cache folder: `$SKINLESION_CACHE`, default `~/.cache/skinlesion` (or under
    `$XDG_CACHE_HOME`). Compiled models live in its `compiled` folder, weights digests beside it
    (extract/digests.py)."""
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skinlesion"
    return Path(root)


def cache_dir() -> Path:
    """The compiled models' folder."""
    return cache_root() / "compiled"


def hardware(device: torch.device) -> str:
    """What the compiled code was specialised for: the GPU model, or the CPU's vector instruction set."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


SUFFIX = {"torch": ".pt2", "openvino": ".ov"}
"""How each runtime's cached model is named: an AOTInductor package file, an OpenVINO IR folder."""


def package_path(
    name: str, identity: dict, precision: str, shape: tuple[int, ...], device: torch.device, *, runtime: str = "torch"
) -> Path:
    """Where the compiled model for these inputs is (or will be) cached."""
    versions = {"torch": torch.__version__}
    if runtime == "openvino":
        import openvino

        versions["openvino"] = openvino.__version__
    key = {
        "format": FORMAT,
        **versions,
        "hardware": hardware(device),
        "device": device.type,
        "runtime": runtime,
        "precision": precision,
        "shape": list(shape),
        **identity,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cache_dir() / f"{safe}-{precision}-{digest}{SUFFIX[runtime]}"


def marker_path(entry: Path) -> Path:
    """The marker beside `entry` that says this cache wrote it (and what its bytes hashed to)."""
    return entry.with_name(entry.name + MARKER_SUFFIX)


def content_digest(entry: Path) -> tuple[str, int]:
    """SHA-256 and size in bytes of an entry: a file's bytes, or a folder's files in the order of their
    relative names, each name and size hashed before its bytes (so that renaming a file, or moving
    bytes from one file to the next, changes the digest too)."""
    digest = hashlib.sha256()
    total = 0
    if entry.is_dir():
        files = sorted((f.relative_to(entry).as_posix(), f) for f in entry.rglob("*") if f.is_file())
    else:
        files = [("", entry)]
    for name, file in files:
        size = file.stat().st_size
        if name:
            digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        total += size
    return digest.hexdigest(), total


def record(entry: Path, content: Path | None = None) -> dict:
    """Write the marker of `entry` (atomically: a whole marker or none) and return what it holds.

    The digest is taken of `content`, by default the entry itself. The cache passes the finished
    temporary file or folder and renames it into place only after the marker is written, so that an
    interruption leaves at worst a marker without its entry (ignored, and overwritten by the next
    write), never an entry without its marker (which would count as someone else's for good)."""
    sha256, size = content_digest(content if content is not None else entry)
    marker = {"format": MARKER_FORMAT, "sha256": sha256, "bytes": size, "entry": entry.name}
    final = marker_path(entry)
    partial = final.with_name(f"{final.name}.{os.getpid()}.partial")
    try:
        partial.write_text(json.dumps(marker) + "\n")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return marker


def is_ours(entry: Path) -> bool:
    """Whether this cache wrote `entry`: its marker is there. Only such entries are ever deleted."""
    return marker_path(entry).is_file()


def cached(entry: Path) -> bool:
    """Whether `entry` is in the cache, written by the cache (cheap: its bytes are not hashed here)."""
    return (entry.exists() and not entry.is_symlink()) and is_ours(entry)


def integrity_problem(entry: Path) -> str | None:
    """Why `entry` cannot be trusted to be what this cache wrote, or None when its bytes still hash to
    what its marker recorded. Guards against accidents and other programs (a truncated copy, a file
    replaced by another tool or restored from elsewhere), not against someone who can write to the
    cache folder: they could rewrite the marker as well."""
    marker = marker_path(entry)
    if not marker.is_file():
        return f"it has no marker {marker.name} beside it, so skinlesion did not write it"
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        return f"its marker {marker.name} cannot be read ({exc})"
    if (
        not isinstance(recorded, dict)
        or recorded.get("format") != MARKER_FORMAT
        or not isinstance(recorded.get("sha256"), str)
    ):
        return f"its marker {marker.name} is not a marker of format {MARKER_FORMAT}"
    if entry.is_symlink():
        return "it is a symbolic link, which the cache never writes"
    if not entry.exists():
        return "it is missing"
    sha256, size = content_digest(entry)
    if sha256 != recorded["sha256"]:
        then = f"{recorded['sha256'][:16]}..., {recorded.get('bytes')} bytes"
        return f"its bytes changed since it was written (sha256 {sha256[:16]}..., {size} bytes; recorded {then})"
    return None


def remove(entry: Path) -> None:
    """Delete an entry of this cache and its marker: the entry first, so that an interrupted deletion
    leaves a marker without its entry (ignored) rather than an entry without its marker."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
    marker_path(entry).unlink(missing_ok=True)


def touch(entry: Path) -> None:
    """Mark `entry` as just used: eviction goes by the modification time of the markers."""
    try:
        os.utime(marker_path(entry))
    except OSError:  # evicted by another run meanwhile: this run has what it loaded
        pass


def load_or_compile(module: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cached AOTInductor package at `path`, or `module` exported on `example`, compiled, cached
    there, loaded.

    A package is native code (a shared library that gets loaded into this process), so before one is
    loaded its SHA-256 is checked against the one its marker recorded when it was written:

    - unchanged: loaded (one that fails to load is deleted and compiled again);
    - changed, or an unreadable marker: not loaded; it is ours, so it is deleted and compiled again;
    - no marker: the file is not ours. It is not loaded, and not deleted, renamed or overwritten
      either, since the user did not ask for that: the module is compiled into a temporary file beside
      it, loaded from there and the temporary file removed, so this run is compiled but nothing is
      cached, and each run warns until the file is moved away.

    Each case but the first logs a warning naming the file and the reason. A fresh package is loaded
    from the temporary file it was compiled into, before that is renamed into place: what runs is
    exactly what was compiled, whatever another run writes to `path` meanwhile.

    Raises whatever export or inductor raise (the caller falls back to eager)."""
    cache = True
    if path.exists() or path.is_symlink():
        problem = integrity_problem(path)
        if problem is None:
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                touch(path)
                return runner
            except Exception as exc:  # e.g. a package of an incompatible torch build: compile it again
                log.warning("%s: cannot load this compiled package (%s); compiling it again", path, exc)
                remove(path)
        elif is_ours(path):
            log.warning("%s: not loading this compiled package: %s; compiling it again", path, problem)
            remove(path)
        else:
            log.warning(
                "%s: not loading this file: %s. It is left as it is, and the model is compiled without "
                "being cached; move the file away to let the cache use its name",
                path,
                problem,
            )
            cache = False
    started = time.monotonic()
    if cache:
        log.info(
            "compiling %s ahead of time (once on this machine; later runs load it from %s)", path.stem, path.parent
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")  # aoti wants the .pt2 suffix
    try:
        exported = torch.export.export(module, (example,))
        with torch._inductor.config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
        runner = torch._inductor.aoti_load_package(str(partial))  # (the loader unpacks it: the file can go)
        if cache:
            record(path, content=partial)  # the marker first: see `record`
            os.replace(partial, path)  # atomic: a concurrent run sees no package or a whole one
    finally:
        partial.unlink(missing_ok=True)
    if cache:
        _done(path, started)
    return runner


def load_or_convert(module: nn.Module, example: torch.Tensor, path: Path, transform: Callable | None = None):
    """The cached OpenVINO model (IR) at `path`, or `module` converted on `example` (then passed
    through `transform`, e.g. quantisation), saved there and returned. Converting traces the model,
    which takes far longer than reading the IR back (docs/commands.md has the figures).

    An IR folder is cached and evicted like a package, marker and all, and one without our marker is
    left alone in the same way (converted into a temporary folder, read from there, nothing cached).
    Its hash is recorded when it is written but not checked before it is read: an IR is data (an XML
    graph and a weights file, parsed by OpenVINO), not code that runs as it is, and checking would
    hash the whole weights file, hundreds of MB for vgg11, at the start of every run."""
    import openvino as ov

    xml = path / "model.xml"
    cache = True
    if path.exists() or path.is_symlink():
        if is_ours(path):
            try:
                model = ov.Core().read_model(xml)
                touch(path)
                return model
            except Exception as exc:
                log.warning("%s: cannot read this OpenVINO model (%s); converting it again", path, exc)
                remove(path)
        else:
            log.warning(
                "%s: not reading this: it has no marker %s beside it, so skinlesion did not write it. "
                "It is left as it is, and the model is converted without being cached; move it away to "
                "let the cache use its name",
                path,
                marker_path(path).name,
            )
            cache = False
    started = time.monotonic()
    if cache:
        log.info(
            "converting %s for OpenVINO (once on this machine; later runs read it from %s)", path.stem, path.parent
        )
    # The batch dimension left free: a model converted for one batch size folds the batch into its
    # shape computations (a ViT's class token broadcast to the batch becomes a constant), and the IR
    # could not then be reshaped to another run's batch.
    model = ov.convert_model(module, example_input=example, input=[ov.PartialShape([-1, *example.shape[1:]])])
    if transform is not None:
        model = transform(model)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        ov.save_model(model, partial / "model.xml", compress_to_fp16=False)  # (the default halves the weights)
        if not cache:  # read before the folder goes (the weights stay mapped once their file is deleted)
            return ov.Core().read_model(partial / "model.xml")
        record(path, content=partial)  # the marker first: see `record`
        try:
            os.replace(partial, path)
        except OSError:  # another run saved the same model first (its marker, equal or not, is rewritten)
            record(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _done(path, started)
    return ov.Core().read_model(path / "model.xml")  # not `model`: every run computes from the same IR


def _done(path: Path, started: float) -> None:
    log.info("compiled %s in %.0f s (%.0f MB)", path.stem, time.monotonic() - started, _size(path) / 1e6)
    evict(path.parent, keep=path)


def _size(entry: Path) -> int:
    if entry.is_dir():
        return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
    return entry.stat().st_size


def evict(folder: Path, keep: Path, limit: int = CACHE_LIMIT_BYTES) -> list[Path]:
    """Delete the least recently used entries of this cache, with their markers, until its entries hold
    at most `limit` bytes; return the entries deleted.

    Only entries with a marker (`record`) count and are deleted: anything else in the folder (a user's
    file, another tool's, a package of an older format) is never touched, whatever its size, and is
    only mentioned in the log. Entries being written by other runs have no marker yet, so they are left
    alone too; so is a marker whose entry is missing (it may be one being written)."""
    entries, foreign = [], []
    for item in folder.iterdir():
        if ".partial" in item.name:
            continue
        if item.name.endswith(MARKER_SUFFIX):
            entry = item.with_name(item.name[: -len(MARKER_SUFFIX)])
            if entry != keep and (entry.exists() and not entry.is_symlink()):
                entries.append((item.stat().st_mtime, entry))
        elif not is_ours(item):
            foreign.append(item)
    entries = [entry for _, entry in sorted(entries, key=lambda pair: pair[0])]
    if foreign:
        log.info(
            "%s: %d items not written by this cache are left as they are: %s",
            folder,
            len(foreign),
            ", ".join(sorted(p.name for p in foreign)[:5]) + (" ..." if len(foreign) > 5 else ""),
        )
    sizes = {p: _size(p) for p in entries}
    total = (_size(keep) if cached(keep) else 0) + sum(sizes.values())
    removed = []
    for old in entries:
        if total <= limit:
            break
        total -= sizes[old]
        remove(old)
        removed.append(old)
    return removed
