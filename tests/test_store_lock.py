"""One writer per store: the lock that `extract` holds on its --out, and journal chunks that cannot collide.

Real processes throughout: two `cli.py extract` on one store, a lock holder in another process, two
processes writing one journal at the same time.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY
from imagefiles import lesion, save

import features.store as store_module
from extract.run import ExtractConfig, extract
from features.lock import StoreLock, lock_path
from features.store import Chunk, FeatureStore, Journal, StoreError, journal_folder

DEADLINE = 120.0
"""Seconds any one wait for another process may take before the test gives up (a loaded machine)."""
HOLDER = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from features.lock import StoreLock
with StoreLock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.readline()
"""
"""Another process that holds a store's lock until it reads a line."""


def _images(root: Path, n: int) -> Path:
    """n tiny images in two class folders."""
    for k in range(n):
        save(root / ("mel" if k % 2 else "nv") / f"im{k:03d}.png", lesion(k, size=(64, 48)))
    return root


def _command(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "extract",
        "--data",
        str(data),
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--out",
        str(out),
        "--precision",
        "fp32",
        "--workers",
        "0",
        "--runtime",
        "torch",
        "--compile",
        "off",
    ]


def _config(data: Path, out: Path, **options) -> ExtractConfig:
    return ExtractConfig(
        data=str(data),
        backbone=TINY,
        weights="none",
        out=str(out),
        precision="fp32",
        workers=0,
        runtime="torch",
        compile="off",
        **options,
    )


def _by_id(path: Path) -> dict[str, np.ndarray]:
    store = FeatureStore(path)
    assert store.done(TINY).all()
    return dict(zip(store.samples().image_id, store.embeddings(TINY)))


def _assert_same_store(path: Path, alone: Path) -> None:
    got, want = _by_id(path), _by_id(alone)
    assert sorted(got) == sorted(want)
    for image_id, x in want.items():
        np.testing.assert_allclose(got[image_id], x, atol=1e-5, err_msg=image_id)


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if proc is not None and proc.poll() is not None:
            output = proc.communicate()[1] if proc.stderr else ""
            pytest.fail(f"{what}: the process exited ({proc.returncode}) first {output[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE:.0f} s")
        time.sleep(0.02)


def _holds(path: Path, pid: int) -> bool:
    try:
        return path.read_text().split()[:1] == [str(pid)]
    except OSError:
        return False


# ------------------------------------------------------------------------------- two extract processes


def test_a_second_extract_on_the_same_store_is_refused_at_once(tmp_path):
    data = _images(tmp_path / "data", 12)
    out = tmp_path / "features.h5"
    first = subprocess.Popen(_command(data, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _holds(lock_path(out), first.pid), "the first extract taking the lock", first)
        # Stopped while it holds the lock, so that however slowly the second starts, the first is
        # still writing the store when the second gets there.
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(_command(data, out), cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE)
        assert first.poll() is None  # refused, not queued: the holder has not moved
    finally:
        if first.returncode is None:
            os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=DEADLINE)
    assert first.returncode == 0, stderr
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
    assert str(out) in lines[0] and f"PID {first.pid}" in lines[0] and "--wait" in lines[0]
    assert second.stdout == ""
    assert not lock_path(out).exists() and not journal_folder(out).exists()
    extract(_config(data, tmp_path / "alone.h5"))
    _assert_same_store(out, tmp_path / "alone.h5")


def test_wait_queues_behind_the_holder_and_writes_the_store(tmp_path):
    data = _images(tmp_path / "data", 12)
    out = tmp_path / "features.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        waiting = threading.Event()

        class Seen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "waiting" in record.getMessage():
                    messages.append(record.getMessage())
                    waiting.set()

        messages: list[str] = []
        logger = logging.getLogger("extract")
        handler, level = Seen(), logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        result: dict = {}

        def run() -> None:
            try:
                result["summary"] = extract(_config(data, out, wait=True))
            except BaseException as exc:  # reported by the main thread
                result["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        try:
            _wait_for(lambda: waiting.is_set() or not worker.is_alive(), "the extract waiting for the lock")
            assert waiting.is_set(), result.get("error")
            time.sleep(0.5)
            assert worker.is_alive() and not out.exists()  # blocked behind the holder
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(DEADLINE) == 0
            worker.join(DEADLINE)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    assert len(messages) == 1 and f"PID {holder.pid}" in messages[0]
    assert result["summary"].embedded == {TINY: 12}
    assert not lock_path(out).exists()
    extract(_config(data, tmp_path / "alone.h5"))
    _assert_same_store(out, tmp_path / "alone.h5")


# ------------------------------------------------------------------------------------------- the lock


def test_a_refusal_names_the_store_the_holder_and_the_fix(tmp_path):
    store = tmp_path / "features.h5"
    with StoreLock(store) as lock:
        assert lock.path == tmp_path / "features.h5.lock" and lock.held
        assert lock.path.read_text().split()[0] == str(os.getpid())
        with pytest.raises(StoreError) as refused:
            _in_thread(lambda: StoreLock(store).acquire())
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{store} is being written by another extract (PID {os.getpid()} on host ")
        assert message.endswith("; wait for it to finish, or rerun with --wait to queue behind it")
    assert not lock.path.exists() and not lock.held
    with StoreLock(store):  # free again
        pass


def test_an_unreadable_lock_file_still_gives_a_message(tmp_path):
    store = tmp_path / "features.h5"
    with open(lock_path(store), "wb") as foreign:  # a holder that wrote no PID we can read
        fcntl.flock(foreign, fcntl.LOCK_EX)
        foreign.write(b"\xff\xfe\x00 garbage")
        foreign.flush()
        with pytest.raises(StoreError, match=r"\(PID unknown\); wait for it to finish"):
            StoreLock(store).acquire()


def test_the_lock_is_not_reentrant(tmp_path):
    with StoreLock(tmp_path / "s.h5"):
        with pytest.raises(RuntimeError, match="not reentrant"):
            StoreLock(tmp_path / "s.h5", wait=True).acquire()


def test_a_waiter_that_wakes_on_a_removed_file_locks_the_new_one(tmp_path):
    """The classic race: a waiter blocks on the lock file, the holder removes it on release. The waiter
    must not end up holding the removed file while a newcomer locks a fresh one."""
    store = tmp_path / "s.h5"
    first = StoreLock(store)
    first.acquire()
    acquired, leave = threading.Event(), threading.Event()

    def waiter() -> None:
        with StoreLock(store, wait=True):
            acquired.set()
            leave.wait(DEADLINE)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)  # (long enough for the waiter to open the file and block on it)
    assert not acquired.is_set()
    first.release()
    assert acquired.wait(DEADLINE)
    try:
        assert first.path.exists()
        with pytest.raises(StoreError):
            _in_thread(lambda: StoreLock(store).acquire())
    finally:
        leave.set()
        thread.join(DEADLINE)
    assert not first.path.exists()


def _in_thread(action) -> None:
    """Run `action` in another thread (a lock held by this one is not reentrant) and re-raise its error."""
    box: dict = {}

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(DEADLINE)
    if "error" in box:
        raise box["error"]


# ------------------------------------------------------------------------------------- journal chunks


def _chunk(ids: list[str]) -> Chunk:
    data = np.arange(len(ids) * 4, dtype=np.float32).reshape(len(ids), 4)
    return Chunk(ids=ids, sha256=[""] * len(ids), embeddings={"b": (ids, data, None)})


def test_two_journals_on_one_folder_keep_every_chunk(tmp_path):
    a, b = Journal(tmp_path / "j"), Journal(tmp_path / "j")
    a.start({"b": "f"}, overwrite=False)
    b.start({"b": "f"}, overwrite=False)
    for k in range(20):
        (a if k % 2 else b).write(_chunk([f"id{k}"]))
    assert len(a.chunks()) == 20
    assert a.done_ids() == {"b": {f"id{k}" for k in range(20)}}
    order = [chunk.ids[0] for chunk in b.read()]
    assert order == [f"id{k}" for k in range(20)]  # in write order, by name


def test_two_processes_writing_one_journal_at_once_keep_every_chunk(tmp_path):
    folder, go, writes = tmp_path / "j", tmp_path / "go", 150
    Journal(folder).start({"b": "f"}, overwrite=False)
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np
        from features.store import Chunk, Journal
        journal = Journal(Path({str(folder)!r}))
        Path(sys.argv[1] + ".ready").touch()
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
        for k in range({writes}):
            ids = [f"{{sys.argv[1]}}-{{k}}"]
            journal.write(Chunk(ids=ids, sha256=[""], embeddings={{"b": (ids, np.zeros((1, 4), np.float32), None)}}))
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / name)], cwd=ROOT, stderr=subprocess.PIPE, text=True
        )
        for name in ("p", "q")
    ]
    try:
        for proc, name in zip(procs, ("p", "q")):
            _wait_for((tmp_path / f"{name}.ready").exists, f"writer {name} starting", proc)
        go.touch()
        errors = [proc.communicate(timeout=DEADLINE)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], errors
    journal = Journal(folder)
    assert len(journal.chunks()) == 2 * writes
    expected = {f"{tmp_path / name}-{k}" for name in ("p", "q") for k in range(writes)}
    assert journal.done_ids() == {"b": expected}
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".npz") == ["fingerprints.json"]


def test_a_full_disk_during_a_chunk_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "j")
    journal.start({"b": "f"}, overwrite=False)
    journal.write(_chunk(["a", "b"]))

    def full(handle, **arrays) -> None:
        handle.write(b"the first bytes of a chunk")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.np, "savez", full)
    with pytest.raises(OSError) as raised:
        journal.write(_chunk(["c"]))
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in journal.folder.iterdir() if p.suffix != ".npz") == ["fingerprints.json"]
    assert len(journal.chunks()) == 1 and journal.done_ids() == {"b": {"a", "b"}}
