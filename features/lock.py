"""One writer per feature store: an exclusive lock that `extract` holds on its --out for the whole run.

Two extractions into the same store would both embed every image and then trip over each other's
journal and assembly, so the second one is refused at once (or, asked to wait, queues behind the first).

The lock is `fcntl.flock` on a file of its own, `<store name>.lock`, in the store's folder:

* not the store itself: the store is replaced by a rename when it is assembled (a lock on the old file
  would no longer guard the path), it does not exist before the first run, and HDF5 takes locks of its
  own on the files it opens;
* not inside the journal folder `<store>.partial/`: that folder is created, discarded (--overwrite)
  and removed by the run the lock guards;
* not in a shared place such as /tmp: beside the store it lives on the store's own file system, so it
  is the same file for every process that can see the store, and it needs no name mapping.

The kernel drops a flock when its holder exits, however it exits (kill -9 included): a crashed run never
leaves a store locked. The lock file holds the holder's PID and host name only so that a refused
process can name it; its content is never trusted for the locking itself.

The lock is not reentrant: a thread that holds it and asks again gets a RuntimeError instead of
refusing (or, waiting, deadlocking) itself.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from features.store import StoreError

__all__ = [
    "StoreLock",
    "lock_path",
]

log = logging.getLogger("extract")

_HELD: set[tuple[str, int, int]] = set()
"""(lock file, PID, thread) of the locks this process holds: a second acquisition by the same thread
is a programming error, found here rather than by a lock that waits for itself."""
_HELD_GUARD = threading.Lock()


def lock_path(store: str | Path) -> Path:
    """The lock file of a store: `<store name>.lock` beside it."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


class StoreLock:
    """Exclusive lock on one store for the duration of a `with` block.

    Refused (wait=False): StoreError naming the store and the holder's PID. Waiting (wait=True): logs
    once that it waits, then blocks until the holder releases the lock or exits.
    """

    def __init__(self, store: str | Path, wait: bool = False):
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.wait = wait
        self._fd: int | None = None
        self._key = ("", 0, 0)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise StoreError (wait=False) while another process holds it."""
        key = (os.path.abspath(self.path), os.getpid(), threading.get_ident())
        with _HELD_GUARD:
            if self._fd is not None or key in _HELD:
                raise RuntimeError(f"{self.path}: this thread already holds the store's lock (it is not reentrant)")
        logged = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    if not self.wait:
                        raise StoreError(
                            f"{self.store} is being written by another extract ({holder}); wait for it to "
                            f"finish, or rerun with --wait to queue behind it"
                        ) from None
                    if not logged:
                        log.info("%s is being written by another extract (%s); waiting for it", self.store, holder)
                        logged = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if not _same_file(fd, self.path):
                    # The holder removed the file while we waited on it (or between our open and
                    # flock): a lock on that inode guards nothing. Start again on the path's file.
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._key = fd, key
            with _HELD_GUARD:
                _HELD.add(key)
            return

    def release(self) -> None:
        """Remove the lock file and let go; a waiter that had opened it starts again on a new one."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlinked while still held, so that no process can take a lock on a file that is about
            # to disappear; the waiters' inode check catches the ones that opened it before.
            if _same_file(fd, self.path):
                os.unlink(self.path)
        finally:
            with _HELD_GUARD:
                _HELD.discard(self._key)
            fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: forked children may share the descriptor
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _holder(fd: int, patience: float = 0.5) -> str:
    """The holder named by the lock file ("PID 1234 on host X"), or "PID unknown". A holder that has just
    taken the lock may not have written its PID yet, so an empty file is read again for up to `patience` s."""
    deadline = time.monotonic() + patience
    while True:
        try:
            text = os.pread(fd, 256, 0).decode("utf-8", errors="replace")
        except OSError:
            text = ""
        if text.strip() or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    fields = text.split()
    if not fields or not fields[0].isdigit():
        return "PID unknown"
    host = fields[1] if len(fields) > 1 and fields[1].isprintable() else ""
    return f"PID {fields[0]} on host {host}" if host else f"PID {fields[0]}"
