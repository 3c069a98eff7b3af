"""What runs a backbone's forward pass: torch (eager, or compiled ahead of time) or OpenVINO.

Both take the same input, a (B, 3, H, W) uint8 batch, and give (B, dim) embeddings; the normalisation
is part of the model each runs (`PixelModel`). The runtime changes the embeddings within the noise of
the precision, so it is part of the store's fingerprint. `--runtime auto` picks the first runtime of
AUTO_ORDER that can run on the device: OpenVINO where it is installed (the `openvino` extra) and the
device is a CPU, since its CPU kernels outran torch's compiled model there (docs/results.md, measured
by bench/extract.py); torch everywhere else.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from extract import compiled
from extract.backbones import Backbone

__all__ = [
    "ALL_PRECISIONS",
    "AUTO_ORDER",
    "CALIBRATION_IMAGES",
    "COMPILE_FROM",
    "OPENVINO_PRECISION",
    "PRECISIONS",
    "RUNTIMES",
    "Calibration",
    "Forward",
    "OpenVINOForward",
    "PixelModel",
    "Runtime",
    "RuntimeUnavailable",
    "TorchForward",
    "compiles",
    "resolve_runtime",
]

log = logging.getLogger("extract")

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""torch's precisions; ALL_PRECISIONS adds the ones only OpenVINO runs."""
ALL_PRECISIONS = (*PRECISIONS, "int8")
COMPILE_FROM = 2000
"""`--compile auto` compiles a backbone that has no compiled package in the cache yet when this many
images or more are to be embedded: about where compiling (once per machine, backbone and batch size)
is won back within the first run (docs/commands.md has the compile times)."""


class RuntimeUnavailable(ValueError):
    """A runtime or precision this machine cannot run; raised before any image is read."""


class PixelModel(nn.Module):
    """A backbone's forward pass from uint8 pixels: normalisation and precision included, so that a
    compiled model holds the whole computation (the normalisation fused into the first layer)."""

    def __init__(self, backbone: Backbone, precision: str):
        super().__init__()
        self.module, self.preprocess, self.precision = backbone.module, backbone.preprocess, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess.normalize(x).contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            return self.module(x)
        with torch.autocast(x.device.type, dtype=PRECISIONS[self.precision]):
            return self.module(x)


class Forward(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A compiled model serves one shape: a short last batch is padded with zeros to `rows`."""
    return torch.cat([x, x.new_zeros((rows - len(x), *x.shape[1:]))]) if len(x) < rows else x


def compiles(setting: str, device: str, images: int, cached: bool = False) -> bool:
    """Whether --compile SETTING compiles a backbone for this many images on this device: under `auto`,
    on a CPU, from COMPILE_FROM images, or for any number once its compiled package is cached."""
    return setting == "on" or (setting == "auto" and device == "cpu" and (images >= COMPILE_FROM or cached))


class TorchForward:
    """Eager torch, or compiled ahead of time (extract/compiled.py) where `--compile` says so.

    Compiled, every batch is padded to the full size (batch size x views), and a failure to compile or
    load warns and falls back to eager (the same runtime and precision: the same embeddings to within
    float rounding)."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        precision: str,
        compile: str,
        images: int,
        rows: int,
        device: torch.device,
        calibration: Calibration | None = None,
    ):
        """`images` to embed in all, in batches of `rows` (batch size x views); `calibration` is unused
        (int8 is OpenVINO's)."""
        self.name, self.rows = backbone.name, rows
        self.eager = PixelModel(backbone, precision)
        crop = backbone.preprocess.crop
        self.package = compiled.package_path(
            backbone.name, backbone.identity(), precision, (rows, 3, crop, crop), device
        )
        self.compile = compiles(compile, device.type, images, compiled.cached(self.package))
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.compile:
            return self.eager(x)
        n, x = len(x), _padded(x, self.rows)
        try:
            if self.compiled is None:
                self.compiled = compiled.load_or_compile(self.eager, x, self.package)
            return self.compiled(x)[:n]
        except Exception as exc:  # inductor needs a C++ compiler and supported ops; eager always works
            log.warning(
                "--compile: compiling %s failed (%s: %s); running it uncompiled",
                self.name,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self.compile = False
            return self.eager(x[:n])


OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
"""Our precision names as OpenVINO's CPU inference-precision hints (int8: the layers NNCF leaves
unquantised run in bf16)."""
CALIBRATION_IMAGES = 300
"""--precision int8 calibrates on the data set's first this many images (NNCF's default subset)."""


@dataclass(frozen=True)
class Calibration:
    """The images an int8 model is calibrated on, and their digest (in the store's fingerprint).

    With a digest and no files, the int8 model made from that calibration must be in the cache:
    `predict` embeds new images with the training store's quantised model, never a new one."""

    digest: str = ""
    files: tuple[Path, ...] = ()


class OpenVINOForward:
    """OpenVINO on the CPU: the fp32 model converted once and cached as IR (extract/compiled.py),
    compiled by OpenVINO for this CPU when the run starts, with the precision as its inference hint.
    int8: the model quantised by NNCF's post-training quantisation on the calibration images, and
    cached under their digest."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        precision: str,
        compile: str,
        images: int,
        rows: int,
        device: torch.device,
        calibration: Calibration = Calibration(),
    ):
        """As TorchForward (`compile` and `images` unused: the IR is always cached)."""
        self.backbone, self.precision, self.rows, self.calibration = backbone, precision, rows, calibration
        crop = backbone.preprocess.crop
        identity = backbone.identity()
        if precision == "int8":
            identity["calibration"] = calibration.digest
        # one cached model for every batch size: it is reshaped to this run's batch when read
        self.path = compiled.package_path(
            backbone.name,
            identity,
            "int8" if precision == "int8" else "fp32",
            (3, crop, crop),
            device,
            runtime="openvino",
        )
        if precision == "int8" and not calibration.files and not compiled.cached(self.path):
            raise RuntimeUnavailable(
                f"{backbone.name}: the int8 model calibrated as {calibration.digest!r} is not in this machine's "
                f"cache ({self.path.parent}); extract the data set it was calibrated on with --precision int8 "
                f"here first"
            )
        self.request = None

    def _start(self, example: torch.Tensor):
        import openvino as ov

        quantize = self._quantize if self.precision == "int8" else None
        model = compiled.load_or_convert(PixelModel(self.backbone, "fp32").eval(), example, self.path, quantize)
        model.reshape(list(example.shape))
        # as many threads as torch was given (torchrun ranks on one CPU share its cores)
        hint = {
            "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[self.precision],
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        }
        return ov.Core().compile_model(model, "CPU", hint).create_infer_request()

    def _quantize(self, model):
        """NNCF post-training quantisation, its statistics taken on the calibration images (batches of
        the model's one shape; the last one filled up with images from the start)."""
        import nncf

        from extract.images import ImageError, load_image

        pictures = []
        for path in self.calibration.files:
            try:
                pictures.append(self.backbone.preprocess.to_uint8(load_image(path)[0]))
            except ImageError:
                continue  # (the digest covers the files' bytes; an unreadable one is left out everywhere)
        if not pictures:
            raise RuntimeUnavailable(f"{self.backbone.name}: none of the calibration images could be read")
        n = -(-len(pictures) // self.rows) * self.rows
        pixels = torch.stack([pictures[i % len(pictures)] for i in range(n)]).numpy()
        batches = [pixels[i : i + self.rows] for i in range(0, n, self.rows)]
        log.info("calibrating int8 %s on %d images", self.backbone.name, len(pictures))
        return nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, x = len(x), _padded(x, self.rows)
        if self.request is None:
            self.request = self._start(x)
        out = self.request.infer({0: x.numpy()})[0]
        return torch.from_numpy(out[:n].copy())


def _openvino_missing(device: str, precision: str) -> str | None:
    if device != "cpu":
        return f"OpenVINO runs here on the CPU only, not on {device} (use --runtime torch)"
    if any(importlib.util.find_spec(name) is None for name in ("openvino", "nncf")[: 1 + (precision == "int8")]):
        return "OpenVINO is not installed: pip install 'skinlesion[openvino]' (or use --runtime torch)"
    if precision not in OPENVINO_PRECISION:
        return f"--runtime openvino runs {', '.join(OPENVINO_PRECISION)}, not {precision}"
    return None


def _torch_missing(device: str, precision: str) -> str | None:
    if precision not in PRECISIONS:
        return f"--precision {precision} runs on --runtime openvino only"
    return None


@dataclass(frozen=True)
class Runtime:
    forward: Callable[..., Forward]
    """Called as forward(backbone, precision=, compile=, images=, rows=, device=, calibration=)."""
    missing: Callable[[str, str], str | None]
    """Why it cannot run on this device in this precision, or None."""


RUNTIMES: dict[str, Runtime] = {
    "torch": Runtime(TorchForward, _torch_missing),
    "openvino": Runtime(OpenVINOForward, _openvino_missing),
}
AUTO_ORDER = ("openvino", "torch")


def resolve_runtime(runtime: str, device: str, precision: str) -> str:
    """`auto` is the first runtime of AUTO_ORDER that runs here; a named one must run here."""
    if runtime == "auto":
        reasons = {name: RUNTIMES[name].missing(device, precision) for name in AUTO_ORDER}
        usable = [name for name, reason in reasons.items() if reason is None]
        if not usable:
            raise RuntimeUnavailable("; ".join(f"{name}: {reason}" for name, reason in reasons.items()))
        return usable[0]
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"--runtime {runtime!r}: choose auto, {', '.join(RUNTIMES)}")
    reason = RUNTIMES[runtime].missing(device, precision)
    if reason:
        raise RuntimeUnavailable(f"--runtime {runtime}: {reason}")
    return runtime
