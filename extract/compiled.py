"""Backbones compiled ahead of time and cached on disk, so that compiling is paid once per machine.

`torch.compile` compiles in every process: 11 s for resnet50 on this project's 2-core CPU even with
inductor's caches warm (tracing and guards are redone), which is longer than embedding 960 images.
AOTInductor instead exports the forward pass once, compiles it to a shared library with the weights
frozen in (BN folded, oneDNN pre-packed: the same kernels as `torch.compile` with freezing), and
writes one `.pt2` package; a later run loads it in under a second. The OpenVINO runtime
(extract/runtimes.py) caches its converted model (IR) here the same way.

A package is only valid for exactly what it was compiled from, so its name is a hash of all of it:
the backbone's identity (weights by content), precision, batch shape, device kind and CPU instruction
set or GPU model, and the torch version. The cache lives in `$SKINLESION_CACHE/compiled` (default
`~/.cache/skinlesion/compiled`) and keeps the most recently used packages within CACHE_LIMIT_BYTES.
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

log = logging.getLogger("extract")

CACHE_ENV = "SKINLESION_CACHE"
CACHE_LIMIT_BYTES = 4 << 30
"""Least recently used models beyond this are deleted (resnet50's torch package in bf16 is 49 MB, vgg11's
OpenVINO model, fp32 weights, 515 MB)."""
FORMAT = 1
"""Bump to orphan every cached package (when what goes into one changes)."""


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skinlesion"
    return Path(root) / "compiled"


def hardware(device: torch.device) -> str:
    """What the compiled code was specialised for: the GPU model, or the CPU's vector instruction set."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


SUFFIX = {"torch": ".pt2", "openvino": ".ov"}
"""How each runtime's cached model is named: an AOTInductor package file, an OpenVINO IR folder."""


def package_path(name: str, identity: dict, precision: str, shape: tuple[int, ...], device: torch.device,
                 runtime: str = "torch") -> Path:  # fmt: skip
    """Where the compiled model for these inputs is (or will be) cached."""
    versions = {"torch": torch.__version__}
    if runtime == "openvino":
        import openvino

        versions["openvino"] = openvino.__version__
    key = {"format": FORMAT, **versions, "hardware": hardware(device), "device": device.type, "runtime": runtime,
           "precision": precision, "shape": list(shape), **identity}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return cache_dir() / f"{safe}-{precision}-{digest}{SUFFIX[runtime]}"


def load_or_compile(module: nn.Module, example: torch.Tensor, path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cached AOTInductor package at `path`, or `module` exported on `example`, compiled, cached
    there, loaded.

    Raises whatever export or inductor raise (the caller falls back to eager)."""
    if path.is_file():
        try:
            runner = torch._inductor.aoti_load_package(str(path))
            os.utime(path)  # recently used: eviction goes by modification time
            return runner
        except Exception as exc:  # a truncated or foreign file: compile it again
            log.warning("%s: cannot load this compiled package (%s); compiling it again", path, exc)
            path.unlink(missing_ok=True)
    started = time.monotonic()
    log.info("compiling %s ahead of time (once on this machine; later runs load it from %s)", path.stem, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")  # aoti wants the .pt2 suffix
    try:
        exported = torch.export.export(module, (example,))
        with torch._inductor.config.patch(freezing=True):
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
        os.replace(partial, path)  # atomic: a concurrent run sees no package or a whole one
    finally:
        partial.unlink(missing_ok=True)
    _done(path, started)
    return torch._inductor.aoti_load_package(str(path))


def load_or_convert(module: nn.Module, example: torch.Tensor, path: Path,
                    transform: Callable | None = None):  # fmt: skip
    """The cached OpenVINO model (IR) at `path`, or `module` converted on `example` (then passed
    through `transform`, e.g. quantisation), saved there and returned. Converting traces the model:
    6 s for resnet50 on this project's CPU, against 0.01-0.1 s to read the IR."""
    import openvino as ov

    xml = path / "model.xml"
    if xml.is_file():
        try:
            model = ov.Core().read_model(xml)
            os.utime(path)
            return model
        except Exception as exc:
            log.warning("%s: cannot read this OpenVINO model (%s); converting it again", path, exc)
            shutil.rmtree(path, ignore_errors=True)
    started = time.monotonic()
    log.info("converting %s for OpenVINO (once on this machine; later runs read it from %s)", path.stem, path.parent)
    model = ov.convert_model(module, example_input=example, input=[tuple(example.shape)])
    if transform is not None:
        model = transform(model)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        ov.save_model(model, partial / "model.xml", compress_to_fp16=False)  # (the default halves the weights)
        try:
            os.replace(partial, path)
        except OSError:  # another run saved the same model first
            pass
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
    """Delete the least recently used models until the folder holds at most `limit` bytes (models being
    written by other runs are left alone)."""
    entries = sorted((p for p in folder.iterdir() if p != keep and ".partial" not in p.name),
                     key=lambda p: p.stat().st_mtime)  # fmt: skip
    sizes = {p: _size(p) for p in entries}
    total = _size(keep) + sum(sizes.values())
    removed = []
    for old in entries:
        if total <= limit:
            break
        total -= sizes[old]
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        removed.append(old)
    return removed
