"""SHA-256 of weights files, hashed once per version of the file rather than at every start.

A backbone's identity names its weights by content (extract/backbones.py), and planning needs that
identity before any image is read: in every `extract`, in every torchrun rank, several times in rank 0.
Hashing a weights file (hundreds of MB for vgg11) each of those times is work that unchanged bytes do
not need. A digest is therefore remembered under the file's version, its resolved path, device, inode,
size and modification time (ns): a file that is rewritten, replaced or touched is hashed again.

Digests are remembered in the process and on disk, in `weights-sha256.json` at the root of the cache
that also holds the compiled models (extract/compiled.py), so that a new process does not hash again
either. That file is an optimisation only: one that cannot be read or written is ignored (the file is
hashed), concurrent writers replace it whole (the last one wins; a lost entry costs one hash), and it
keeps the MAX_ENTRIES most recently used digests. Like the compiled cache it guards against accidents,
not against someone who can write to the cache folder.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from extract.compiled import cache_root
from extract.images import file_sha256

__all__ = ["DIGESTS_NAME", "MAX_ENTRIES", "DigestCache", "weights_sha256"]

DIGESTS_NAME = "weights-sha256.json"
"""The on-disk memory of digests, at the cache's root (`$SKINLESION_CACHE`, see extract/compiled.py)."""
MAX_ENTRIES = 64
"""Digests kept on disk, the most recently used: far more weights files than a machine uses at once."""
FORMAT = 1


class DigestCache:
    """SHA-256 of files by version: from memory, else from the file `store` (None: memory only), else
    hashed and remembered in both."""

    def __init__(self, store: Path | None):
        self.store = store
        self._known: dict[str, str] = {}
        self._guard = threading.Lock()

    def sha256(self, path: str | Path) -> str:
        """The SHA-256 of the file's bytes; raises OSError as reading the file would."""
        version = _version(Path(path))
        with self._guard:
            if version in self._known:
                return self._known[version]
        on_disk = self._read()
        digest = on_disk.get(version) or file_sha256(path)
        with self._guard:
            self._known[version] = digest
        self._write(on_disk, version, digest)
        return digest

    def _read(self) -> dict[str, str]:
        if self.store is None:
            return {}
        try:
            content = json.loads(self.store.read_text())
        except (OSError, ValueError):
            return {}
        files = content.get("files") if isinstance(content, dict) and content.get("format") == FORMAT else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}

    def _write(self, on_disk: dict[str, str], version: str, digest: str) -> None:
        """Remember `digest` on disk as the most recently used entry (unless it already is)."""
        if self.store is None or list(on_disk)[-1:] == [version]:
            return
        on_disk.pop(version, None)
        on_disk[version] = digest
        kept = dict(list(on_disk.items())[-MAX_ENTRIES:])
        partial = self.store.with_name(f"{self.store.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            self.store.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"format": FORMAT, "files": kept}, indent=1) + "\n")
            os.replace(partial, self.store)  # whole or not at all: readers never see half a file
        except OSError:
            pass  # a read-only or full cache: the digest is still right, only not remembered
        finally:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass


def _version(path: Path) -> str:
    """The file's identity and version as a key: another path, file, size or time is another key."""
    resolved = path.resolve()
    stat = resolved.stat()
    return json.dumps([str(resolved), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns])


_CACHES: dict[Path, DigestCache] = {}
_CACHES_GUARD = threading.Lock()


def weights_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file, hashed at most once per version of the file (see the module)."""
    store = cache_root() / DIGESTS_NAME  # looked up each time: $SKINLESION_CACHE may change (tests)
    with _CACHES_GUARD:
        cache = _CACHES.setdefault(store, DigestCache(store))
    return cache.sha256(path)
