"""The compiled-model cache touches only what it wrote, and loads a package only if it is unchanged.

Nothing is compiled here: inductor's compiler and loader are replaced by fakes that write and read a
few bytes, so these tests exercise the cache's own logic in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from extract import compiled


def _fake_entry(folder: Path, name: str, size: int, age: float) -> Path:
    """An entry written by the cache (a .pt2 file, or a .ov folder) with its marker, last used `age` s ago."""
    entry = folder / name
    if name.endswith(".ov"):
        entry.mkdir(parents=True)
        (entry / "model.xml").write_bytes(b"<net/>")
        (entry / "model.bin").write_bytes(b"w" * (size - len(b"<net/>")))
    else:
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_bytes(b"p" * size)
    compiled.record(entry)
    stamp = 1e9 - age
    os.utime(compiled.marker_path(entry), (stamp, stamp))
    return entry


def test_evict_deletes_only_its_own_entries_with_their_markers(compiled_cache):
    old = _fake_entry(compiled_cache, "old-fp32-aaaa.pt2", 1000, age=30)
    older_ir = _fake_entry(compiled_cache, "older-fp32-bbbb.ov", 1000, age=40)
    recent = _fake_entry(compiled_cache, "recent-bf16-cccc.pt2", 1000, age=10)
    keep = _fake_entry(compiled_cache, "new-bf16-dddd.pt2", 1000, age=0)
    notes = compiled_cache / "notes.bin"
    notes.write_bytes(os.urandom(10 << 20))  # a user's 10 MB file, far over any limit
    os.utime(notes, (1, 1))  # and the least recently used thing in the folder
    foreign = compiled_cache / "other-tool.ov"
    foreign.mkdir()
    (foreign / "model.xml").write_text("<net/>")
    stray = compiled_cache / "looks-like-ours-fp32-eeee.pt2"  # our naming, but no marker: not ours
    stray.write_bytes(b"x" * 5000)
    os.utime(stray, (1, 1))
    writing = compiled_cache / "busy-fp32-ffff.pt2.123.partial.pt2"  # another run's unfinished package
    writing.write_bytes(b"x" * 5000)

    removed = compiled.evict(compiled_cache, keep=keep, limit=1)

    assert removed == [older_ir, old, recent]  # least recently used first, every one of ours over the limit
    for entry in removed:
        assert not entry.exists() and not compiled.marker_path(entry).exists()
    assert keep.is_file() and compiled.marker_path(keep).is_file()
    assert notes.stat().st_size == 10 << 20 and (foreign / "model.xml").read_text() == "<net/>"
    assert stray.stat().st_size == 5000 and writing.is_file()


def test_evict_counts_only_its_own_entries_against_the_limit(compiled_cache):
    recent = _fake_entry(compiled_cache, "recent-fp32-aaaa.pt2", 100, age=10)
    keep = _fake_entry(compiled_cache, "new-fp32-bbbb.pt2", 100, age=0)
    (compiled_cache / "notes.bin").write_bytes(b"n" * 10_000)  # not ours: does not count
    assert compiled.evict(compiled_cache, keep=keep, limit=250) == []
    assert recent.is_file()


def test_marker_records_the_hash_and_size_of_a_file_or_a_folder(compiled_cache):
    package = _fake_entry(compiled_cache, "m-fp32-aaaa.pt2", 321, age=0)
    marker = json.loads(compiled.marker_path(package).read_text())
    assert marker["format"] == 1 and marker["bytes"] == 321 and len(marker["sha256"]) == 64
    assert compiled.integrity_problem(package) is None
    ir = _fake_entry(compiled_cache, "m-fp32-bbbb.ov", 300, age=0)
    assert json.loads(compiled.marker_path(ir).read_text())["bytes"] == 300
    assert compiled.integrity_problem(ir) is None
    (ir / "model.bin").write_bytes(b"W" * 294)  # same size, other weights
    assert "changed" in compiled.integrity_problem(ir)
    assert [p.name for p in compiled_cache.iterdir() if ".partial" in p.name] == []  # written atomically


class _FakeInductor:
    """Stands in for export, aoti_compile_and_package and aoti_load_package: a 'package' is some bytes,
    and loading one records which bytes were loaded."""

    def __init__(self, monkeypatch):
        self.compiled = 0
        self.loaded: list[bytes] = []
        monkeypatch.setattr(compiled.torch.export, "export", lambda module, args: "exported")
        monkeypatch.setattr(compiled.torch._inductor, "aoti_compile_and_package", self.compile)
        monkeypatch.setattr(compiled.torch._inductor, "aoti_load_package", self.load)

    def compile(self, exported, package_path: str) -> str:
        self.compiled += 1
        Path(package_path).write_bytes(b"PK fresh package %d" % self.compiled)
        return package_path

    def load(self, path: str):
        data = Path(path).read_bytes()
        self.loaded.append(data)
        return lambda x: x


@pytest.fixture
def package(compiled_cache) -> Path:
    return compiled.package_path("tiny", {"weights_sha256": "0" * 64}, "fp32", (1, 4), torch.device("cpu"))


def test_a_package_changed_after_it_was_written_is_not_loaded_but_rebuilt(monkeypatch, caplog, package):
    fake = _FakeInductor(monkeypatch)
    compiled.load_or_compile(nn.Identity(), torch.zeros(1, 4), package)
    assert fake.compiled == 1 and compiled.integrity_problem(package) is None
    compiled.load_or_compile(nn.Identity(), torch.zeros(1, 4), package)  # unchanged: loaded from the cache
    assert fake.compiled == 1 and fake.loaded == [b"PK fresh package 1"] * 2

    package.write_bytes(b"PK tampered native code")  # e.g. replaced by another tool, or a bad disk
    with caplog.at_level(logging.WARNING, logger="extract"):
        compiled.load_or_compile(nn.Identity(), torch.zeros(1, 4), package)
    assert b"PK tampered native code" not in fake.loaded
    assert fake.compiled == 2 and fake.loaded[-1] == b"PK fresh package 2"
    assert str(package) in caplog.text and "sha256" in caplog.text
    assert package.read_bytes() == b"PK fresh package 2" and compiled.integrity_problem(package) is None


def test_a_file_without_our_marker_is_neither_loaded_nor_touched(monkeypatch, caplog, package):
    fake = _FakeInductor(monkeypatch)
    package.parent.mkdir(parents=True, exist_ok=True)
    package.write_bytes(b"PK someone else's file")
    os.utime(package, (1e9, 1e9))
    with caplog.at_level(logging.WARNING, logger="extract"):
        runner = compiled.load_or_compile(nn.Identity(), torch.zeros(1, 4), package)
    assert runner is not None and fake.compiled == 1 and fake.loaded == [b"PK fresh package 1"]
    assert package.read_bytes() == b"PK someone else's file" and package.stat().st_mtime == 1e9
    assert not compiled.marker_path(package).exists()
    assert str(package) in caplog.text and "marker" in caplog.text
    assert sorted(p.name for p in package.parent.iterdir()) == [package.name]  # nothing left behind
