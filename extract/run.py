"""`cli.py extract`: a data set in, a feature store out, for one or several backbones in one pass.

Each image is read and decoded once (in DataLoader workers), preprocessed once per distinct
preprocessing, embedded by every backbone that still lacks it, and journalled; the store is assembled
at the end. Rerunning the same command resumes an interrupted run and embeds only new or changed
images.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from extract.backbones import (
    Backbone,
    DEFAULT_OPTIONS,
    BackboneError,
    BackboneOptions,
    BackboneSpec,
    backbone_spec,
    build_backbone,
)
from extract.decoding import AUTO_DECODE, DECODERS
from extract.images import file_sha256
from extract.manifest import Manifest, read_manifest
from extract.preprocess import VIEWS, apply_views
from extract.runtimes import (
    ALL_PRECISIONS,
    CALIBRATION_IMAGES,
    RUNTIMES,
    Calibration,
    Forward,
    RuntimeUnavailable,
    resolve_runtime,
)
from extract.summary import Summary
from features.lock import StoreLock
from features.store import (
    BackboneLayout,
    Chunk,
    FeatureStore,
    Journal,
    Samples,
    StoreError,
    assemble,
    describe_mismatch,
    fingerprint,
    journal_folder,
    merge_samples,
)

__all__ = [
    "ConfigError",
    "ExtractConfig",
    "Plan",
    "Throughput",
    "backbone_layouts",
    "BackboneChoice",
    "backbone_choices",
    "backbone_specs",
    "cuda_settings",
    "default_workers",
    "extract",
    "plan_rows",
    "refuse_other_settings",
    "resolve_calibration",
    "resolve_decode",
    "resolve_device",
    "stored_decode",
    "resolve_precision",
    "yield_to_the_model",
]

log = logging.getLogger("extract")


class ConfigError(ValueError):
    """An option value that cannot work; raised before any image is read."""


@dataclass
class ExtractConfig:
    """Every option of `cli.py extract` and its default: the one place these defaults live."""

    data: str = ""
    images: str | None = None
    backbone: str = ""
    """Comma-separated backbone names."""
    weights: str = "default"
    """`default`, `none` or a file; comma-separated to give each backbone its own."""
    pool: str = DEFAULT_OPTIONS.pool
    """A transformer's pooling (timm: backbones): `auto` (the model's own), `token`, `avg` or `token+avg`.
    This and the next two, as --weights: one value for every backbone, or comma-separated, one each."""
    input_size: int | str = DEFAULT_OPTIONS.input_size
    """Side of the input in pixels (timm: and open_clip: backbones); 0: the weights' own."""
    clip_embed: str = DEFAULT_OPTIONS.clip_embed
    """An OpenCLIP image tower's embedding before (`pre`) or after (`post`) its projection."""
    out: str = "features.h5"
    batch_size: int = 0
    """Images per batch; 0 picks one for the device."""
    workers: int = -1
    """DataLoader decoding processes; -1 picks one for the machine, 0 decodes in the main process."""
    device: str = "auto"
    precision: str = "auto"
    tta: str = "none"
    decode: str = "auto"
    """How JPEGs are decoded and resized (extract/decoding.py): `pil` (Pillow in the DataLoader workers),
    `torch` (torchvision: in batches on a GPU with nvJPEG, in the workers on a CPU), `auto` = the decoder
    of the embeddings already in --out, else `decoding.AUTO_DECODE`."""
    runtime: str = "auto"
    """`torch`, `openvino` (CPU only, the `openvino` extra) or `auto` = OpenVINO where it is installed and
    the device is a CPU, torch elsewhere (extract/runtimes.py)."""
    calibration: str = ""
    """--precision int8: empty to calibrate on the data set's first CALIBRATION_IMAGES images (the run
    sets it to their digest), or the digest of an earlier calibration whose model must be cached (what
    `predict` passes: new images are embedded with the training store's quantised model)."""
    compile: str = "auto"
    """For the torch runtime, compile each backbone ahead of time and cache it (extract/compiled.py):
    `on`, `off`, or `auto` = on for a CPU when the package is cached or at least COMPILE_FROM images are
    to be embedded, off on a GPU (where decoding, not the model, bounds extraction, so compiling adds
    start-up time and gains nothing: docs/results.md). Falls back to eager, with a warning, where
    compiling fails."""
    strict: bool = False
    max_failed: float = 0.5
    """The exit status is 1 when more than this share of the data set's images could not be used (a
    mostly failed extraction is not a success: e.g. a manifest pointed at the wrong --images folder)."""
    overwrite: bool = False
    flush_rows: int = 512
    """Rows per journal file: at most this much work is redone after a crash."""
    flush_seconds: float = 60.0
    """...or at most this many seconds of it."""
    wait: bool = False
    """If another process is writing --out, wait for it instead of refusing."""

    def resolved(self) -> "ExtractConfig":
        """A copy with every `auto` choice made for this machine (what the store records)."""
        device = resolve_device(self.device)
        precision = resolve_precision(self.precision, device)
        try:
            runtime = resolve_runtime(self.runtime, device, precision)
        except RuntimeUnavailable as exc:
            raise ConfigError(str(exc)) from None
        return dataclasses.replace(
            self,
            device=device,
            precision=precision,
            runtime=runtime,
            decode=resolve_decode(self.decode, Path(self.out)),
            batch_size=self.batch_size or (64 if device.startswith("cuda") else 16),
            workers=self.workers if self.workers >= 0 else default_workers(device),
        )


def default_workers(device: str) -> int:
    """Decoding processes: on a CPU they share the cores with the model, which bounds the throughput
    there (4 at most: beyond what keeps the model fed, decoders only take cycles from it); on a GPU the
    cores have nothing else to do, and decoding is what bounds the throughput, so all but one decode."""
    spare = max(0, (os.cpu_count() or 1) - 1)
    return spare if device.startswith("cuda") else min(4, spare)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
    return device


def resolve_decode(decode: str, out: Path | None = None) -> str:
    """`auto`: the decoder of the embeddings already in `out` where it holds some, else AUTO_DECODE.
    Following the store keeps the promise that rerunning a command resumes it: a store made before
    --decode existed (Pillow's) is extended, not refused for other settings."""
    if decode == "auto":
        return stored_decode(out) or AUTO_DECODE
    if decode not in DECODERS:
        raise ConfigError(f"--decode {decode!r}: choose auto, {', '.join(DECODERS)}")
    return decode


def stored_decode(out: Path | None) -> str | None:
    """The one decoder of the store's embeddings (`pil` for those from before --decode), or None: no
    store there (an unreadable file is reported by the run itself), no embeddings, or several decoders."""
    if out is None or not out.is_file():
        return None
    try:
        store = FeatureStore(out)
        decoders = {str(store.backbone_attrs(name).get("decode", "pil")) for name in store.backbones}
    except StoreError:
        return None
    return decoders.pop() if len(decoders) == 1 else None


def resolve_precision(precision: str, device: str) -> str:
    """`auto` is the fastest precision the device runs natively (bf16 on AVX-512-bf16/AMX CPUs)."""
    if precision != "auto":
        if precision not in ALL_PRECISIONS:
            raise ConfigError(f"--precision {precision!r}: choose auto, {', '.join(ALL_PRECISIONS)}")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bf16"
    return "fp32"


# ----------------------------------------------------------------------------------------- planning


def _backbone_attrs(backbone: BackboneSpec, cfg: ExtractConfig) -> dict:
    """The store attributes of a backbone's embeddings, its fingerprint among them: the spec's identity
    and the run's precision, views, runtime (and int8 calibration), with the library versions."""
    identity = {**backbone.identity(), "precision": cfg.precision, "views": cfg.tta, "runtime": cfg.runtime}
    if cfg.decode != "pil":  # stores decoded by Pillow keep the fingerprint they had before --decode
        identity["decode"] = cfg.decode
    if cfg.precision == "int8":
        identity["calibration"] = cfg.calibration
    preprocess = backbone.preprocess
    crop = {"crop_pct": preprocess.crop_pct, "crop_mode": preprocess.crop_mode} if preprocess.crop_pct else {}
    return {
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "random_init": backbone.random_init,
        "dim": backbone.dim,
        "input_size": backbone.preprocess.crop,
        "resize": backbone.preprocess.resize,
        "mean": list(backbone.preprocess.mean),
        "std": list(backbone.preprocess.std),
        "interpolation": backbone.preprocess.interpolation,
        **crop,
        **dict(backbone.settings),  # pool, clip_embed (and input_size again) where the family takes them
        **({"license": backbone.license} if backbone.license else {}),
        "precision": cfg.precision,
        "views": cfg.tta,
        "runtime": cfg.runtime,
        "decode": cfg.decode,
        "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
        **({"openvino_version": _openvino_version()} if cfg.runtime == "openvino" else {}),
        **({"calibration": cfg.calibration} if cfg.precision == "int8" else {}),
        "fingerprint": fingerprint(identity),
        "identity": json.dumps(identity, sort_keys=True),
    }


def resolve_calibration(
    cfg: ExtractConfig, manifest: Manifest, whole: Manifest | None = None
) -> tuple[ExtractConfig, Calibration]:
    """--precision int8: the calibration images, the first CALIBRATION_IMAGES of the whole data set
    (`whole` if the caller has it, else --data when given: a torchrun rank's manifest is only its
    shard), and the config with their digest. The digest covers the files' bytes, so the same data
    set gives the same fingerprint."""
    if cfg.precision != "int8":
        return cfg, Calibration()
    if cfg.calibration:
        return cfg, Calibration(cfg.calibration)
    source = whole or (read_manifest(cfg.data, cfg.images) if cfg.data else manifest)
    files = tuple(source.file(r) for r in range(min(CALIBRATION_IMAGES, len(source))))

    def sha(path: Path) -> str:
        try:
            return file_sha256(path)
        except OSError:
            return "unreadable"

    digest = hashlib.sha256("".join(map(sha, files)).encode()).hexdigest()[:16]
    return dataclasses.replace(cfg, calibration=digest), Calibration(digest, files)


def _openvino_version() -> str:
    import openvino

    return str(openvino.__version__)


def refuse_other_settings(out: Path, layouts: list[BackboneLayout], overwrite: bool) -> None:
    """Raise StoreError if the store at `out` holds any of these backbones with another fingerprint
    (unless `overwrite`): embeddings made with other settings are never mixed with new ones."""
    if overwrite or not out.is_file():
        return
    store = FeatureStore(out)
    for layout in layouts:
        if layout.name in store.backbones:
            stored = store.backbone_attrs(layout.name)
            if stored.get("fingerprint") != layout.attrs["fingerprint"]:
                raise StoreError(_mismatch(out, layout, stored))


@dataclass
class Plan:
    """The store's rows after a run, and per backbone which of them the run must embed."""

    samples: Samples
    """The existing store's rows, then the manifest's new ones."""
    todo: dict[str, np.ndarray]
    """backbone -> (len(samples),) bool: rows this run embeds."""

    def rows(self) -> np.ndarray:
        """Rows that some backbone still needs, in order: the rows to decode."""
        return np.flatnonzero(np.any(list(self.todo.values()), axis=0))


def plan_rows(out: Path, manifest: Manifest, layouts: list[BackboneLayout], journal: Journal) -> Plan:
    """What an extraction of `manifest` into `out` must embed: rows of the manifest that a backbone
    lacks in the store (or has with another fingerprint, which --overwrite replaces), or whose file
    changed since, and that the journal does not already hold. Reads the store and the journal only."""
    old = FeatureStore(out) if out.is_file() else None
    old_samples = old.samples() if old else Samples()
    merged = merge_samples(old_samples, manifest)
    n_old = len(old_samples)
    in_manifest = np.zeros(len(merged), dtype=bool)
    row_of = {image_id: row for row, image_id in enumerate(merged.image_id)}
    in_manifest[[row_of[i] for i in manifest.image_id]] = True
    journalled = journal.done_ids()
    stale = _changed_files(old_samples, manifest) if old else set()
    todo = {}
    for layout in layouts:
        done = np.zeros(len(merged), dtype=bool)
        if (
            old
            and layout.name in old.backbones
            and old.backbone_attrs(layout.name).get("fingerprint") == layout.attrs["fingerprint"]
        ):
            done[:n_old] = old.done(layout.name)  # (other settings: replaced, as --overwrite asked)
        done[[row_of[i] for i in stale]] = False
        done[[row_of[i] for i in journalled.get(layout.name, ()) if i in row_of]] = True
        todo[layout.name] = in_manifest & ~done
    return Plan(merged, todo)


def _mismatch(out: Path, layout: BackboneLayout, stored: dict) -> str:
    differ = describe_mismatch(stored.get("identity"), layout.attrs["identity"], names=("store", "now"))
    return (
        f"{out} already holds {layout.name} embeddings made with other settings "
        f"(fingerprint {stored.get('fingerprint')} vs {layout.attrs['fingerprint']}; {differ}). Write to "
        "another --out, or pass --overwrite to replace them."
    )


def _changed_files(old: Samples, manifest: Manifest) -> set[str]:
    """Ids already in the store whose image file now has other bytes: they are embedded again."""
    stored = dict(zip(old.image_id, old.sha256))
    files = {i: manifest.file(r) for r, i in enumerate(manifest.image_id) if stored.get(i)}

    def changed(item: tuple[str, Path]) -> bool:
        image_id, path = item
        try:
            return file_sha256(path) != stored[image_id]
        except OSError:
            return False  # a file gone missing keeps the embedding it had

    with ThreadPoolExecutor(8) as pool:
        flags = list(pool.map(changed, files.items()))
    stale = {image_id for image_id, flag in zip(files, flags) if flag}
    if stale:
        log.warning("%d images changed since they were embedded; embedding them again", len(stale))
    return stale


# ----------------------------------------------------------------------------------------- running


def _per_backbone(flag: str, value: object, n: int) -> list[str]:
    """The values of an option that takes one value for every backbone, or one per backbone."""
    parts = [p.strip() for p in str(value).split(",")]
    if len(parts) not in (1, n):
        raise ConfigError(f"{flag} {value}: give one value, or one per backbone ({n}), comma-separated")
    return parts * n if len(parts) == 1 else parts


@dataclass(frozen=True)
class BackboneChoice:
    """One backbone of the options: its name, weights and how it embeds."""

    name: str
    weights: str
    options: BackboneOptions


def backbone_choices(cfg: ExtractConfig) -> list[BackboneChoice]:
    """Each backbone with its --weights, --pool, --input-size and --clip-embed (each option one value for
    every backbone or one per backbone; a family refuses the ones that do not apply to it), checked
    before anything is read or loaded."""
    if cfg.tta not in VIEWS:
        raise ConfigError(f"--tta {cfg.tta!r}: choose {', '.join(VIEWS)}")
    if cfg.compile not in ("auto", "on", "off"):
        raise ConfigError(f"--compile {cfg.compile!r}: choose auto, on or off")
    names = [n.strip() for n in cfg.backbone.split(",") if n.strip()]
    if not names:
        raise ConfigError("--backbone: name at least one backbone (see `cli.py backbones`)")
    n = len(names)
    columns = zip(
        _per_backbone("--weights", cfg.weights, n),
        _per_backbone("--pool", cfg.pool, n),
        _per_backbone("--input-size", cfg.input_size, n),
        _per_backbone("--clip-embed", cfg.clip_embed, n),
    )
    choices = []
    for name, (weights, pool, size, clip_embed) in zip(names, columns):
        if not size.isdigit():
            raise ConfigError(
                f"--input-size {cfg.input_size}: {size!r} is not a number of pixels (0: the weights' own)"
            )
        try:
            options = BackboneOptions(pool=pool, input_size=int(size), clip_embed=clip_embed)
        except BackboneError as exc:
            raise ConfigError(str(exc)) from None
        choices.append(BackboneChoice(name, weights, options))
    return choices


def backbone_specs(cfg: ExtractConfig) -> list[BackboneSpec]:
    """The backbones of the options, as specs: nothing is built (extract builds what it runs)."""
    choices = backbone_choices(cfg)
    try:
        return [backbone_spec(c.name, c.weights, c.options) for c in choices]
    except BackboneError as exc:
        if len(choices) > 1 and str(exc).startswith("--"):  # an option that one of them does not take
            raise BackboneError(f"{exc} (several backbones: give each its own value, comma-separated)") from None
        raise


def _layout(spec: BackboneSpec, cfg: ExtractConfig) -> BackboneLayout:
    return BackboneLayout(spec.name, spec.dim, len(VIEWS[cfg.tta]), _backbone_attrs(spec, cfg))


def backbone_layouts(cfg: ExtractConfig) -> list[BackboneLayout]:
    """The store layouts (with fingerprints) that a resolved config's backbones write, without building
    any of them: what planning and torchrun's shards need."""
    return [_layout(spec, cfg) for spec in backbone_specs(cfg)]


def extract(cfg: ExtractConfig, manifest: Manifest | None = None, *, lock: StoreLock | None = None) -> Summary:
    """Run an extraction as configured (of `manifest` instead of --data, if given); return what it did.

    One writer per store, from the plan to the assembled store: the run holds the lock of --out
    (features/lock.py), so a second extraction on it is refused before it does any work (or, with
    cfg.wait, plans only once the first has finished). A caller that already holds that lock passes it
    as `lock` (rank 0 of a torchrun job, which holds it while it gathers the shards)."""
    started = time.monotonic()
    cfg = cfg.resolved()
    backbone_choices(cfg)
    given = manifest
    manifest = manifest or read_manifest(cfg.data, cfg.images)
    cfg, calibration = resolve_calibration(cfg, manifest, whole=None if given else manifest)
    specs = backbone_specs(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if lock is not None and not (lock.held and lock.store.resolve() == out.resolve()):
        raise RuntimeError(f"extract(lock=...): the lock passed is not a held lock of {out}")
    with contextlib.nullcontext() if lock is not None else StoreLock(out, wait=cfg.wait):
        summary = _extract_locked(cfg, manifest, specs, calibration)
    summary.seconds = time.monotonic() - started
    return summary


def _extract_locked(
    cfg: ExtractConfig, manifest: Manifest, specs: list[BackboneSpec], calibration: Calibration
) -> Summary:
    """The extraction proper, with the store's lock held: plan, embed, assemble."""
    out = Path(cfg.out)
    for spec in specs:
        if spec.random_init:
            log.warning(
                "%s has RANDOM weights (--weights none): its embeddings carry no ImageNet knowledge; "
                "use them for tests only. The store marks them random_init=True.",
                spec.name,
            )
    layouts = [_layout(spec, cfg) for spec in specs]
    refuse_other_settings(out, layouts, cfg.overwrite)
    journal = Journal(journal_folder(out))
    journal.start({layout.name: layout.attrs["fingerprint"] for layout in layouts}, cfg.overwrite)
    plan = plan_rows(out, manifest, layouts, journal)
    summary = Summary(store=out, images=len(manifest), embedded={spec.name: 0 for spec in specs})
    log.info("%s: %d images (%s); store %s", manifest.source, len(manifest), manifest.kind, out)
    # Built only when there is a row to embed: a rerun with nothing new, or rank 0 assembling a
    # torchrun job's shards, builds no network.
    backbones = _build(specs, journal) if len(plan.rows()) else []
    _embed(cfg, manifest, plan, backbones, journal, summary, calibration=calibration)
    root_attrs = {
        "data_root": str(manifest.root.resolve()),
        "extract_config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
    }
    assemble(out, plan.samples, layouts, journal, root_attrs, manifest.image_id)
    failed = FeatureStore(out).failed()
    summary.failed = {i: failed[i] for i in manifest.image_id if i in failed}
    return summary


def _build(specs: list[BackboneSpec], journal: Journal) -> list[Backbone]:
    """The networks of the specs. A weights file that does not load (not a state dict of the network)
    is found only here, after the journal was started: if nothing is journalled yet, the journal goes
    too, or it would hold this run's fingerprints and refuse the rerun with the corrected file."""
    try:
        return [build_backbone(spec) for spec in specs]
    except BaseException:
        if not journal.chunks():
            journal.remove()
        raise


def _embed(
    cfg: ExtractConfig,
    manifest: Manifest,
    plan: Plan,
    backbones: list[Backbone],
    journal: Journal,
    summary: Summary,
    *,
    calibration: Calibration,
) -> None:
    """Decode every row some backbone still needs, embed it with each backbone that needs it, and
    journal the results in blocks; count them in `summary`."""
    rows = plan.rows()
    if len(rows) == 0:
        return
    todo, samples = plan.todo, plan.samples
    device = torch.device(cfg.device)
    preprocesses = list(dict.fromkeys(b.preprocess for b in backbones))
    row_file = {image_id: manifest.file(r) for r, image_id in enumerate(manifest.image_id)}
    files = [row_file[samples.image_id[r]] for r in rows]
    for backbone in backbones:
        backbone.module.to(device, memory_format=torch.channels_last)
    rows_per_batch = cfg.batch_size * len(VIEWS[cfg.tta])
    runtime = RUNTIMES[cfg.runtime].forward
    forwards = {
        b.name: runtime(
            b,
            precision=cfg.precision,
            compile=cfg.compile,
            images=len(rows),
            rows=rows_per_batch,
            device=device,
            calibration=calibration,
        )
        for b in backbones
    }
    decoder = DECODERS[cfg.decode](files, preprocesses, device)
    loader = DataLoader(
        decoder.dataset(),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=decoder.collate,
        pin_memory=device.type == "cuda" and decoder.pin_memory,
        worker_init_fn=yield_to_the_model if device.type == "cpu" else None,
    )
    pending = _Pending()
    n_failed = 0
    last_flush = time.monotonic()
    rate = Throughput()
    progress = tqdm(
        total=len(rows),
        unit="img",
        desc="extract",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 15.0,  # a log file gets a line every 15 s
    )
    try:
        with torch.inference_mode(), cuda_settings(device, cfg.precision):
            for batch in loader:
                positions, shas, tensors, failures = decoder.finish(batch, device)
                batch_rows = rows[positions]
                pending.ids += [samples.image_id[r] for r in batch_rows]
                pending.sha256 += shas
                pending.failed.update({samples.image_id[rows[p]]: reason for p, reason in failures.items()})
                n_failed += len(failures)
                for backbone in backbones:
                    need = todo[backbone.name][batch_rows]
                    if need.any():
                        x = tensors[preprocesses.index(backbone.preprocess)]
                        x = x if need.all() else x[torch.from_numpy(need)]  # (a copy is not pinned)
                        ids = [samples.image_id[r] for r in batch_rows[need]]
                        embedded = _forward(backbone, forwards[backbone.name], x, cfg.tta, device)
                        pending.add(backbone.name, ids, embedded)
                        summary.embedded[backbone.name] += int(need.sum())
                progress.update(len(positions) + len(failures))
                progress.set_postfix(failed=n_failed, refresh=False)
                rate.add(len(positions))
                if len(pending) >= cfg.flush_rows or time.monotonic() - last_flush > cfg.flush_seconds:
                    journal.write(pending.chunk())
                    pending, last_flush = _Pending(), time.monotonic()
    except KeyboardInterrupt:
        journal.write(pending.chunk())
        log.error("interrupted: finished rows are kept in %s; rerun the same command to resume", journal.folder)
        raise
    finally:
        progress.close()
    journal.write(pending.chunk())
    summary.steady_images_per_s = rate.steady()
    if decoder.fallbacks:
        log.info(
            "--decode %s: %d of %d images went through Pillow (not a colour JPEG, or rejected by the batch decoder)",
            cfg.decode,
            decoder.fallbacks,
            len(rows),
        )


def yield_to_the_model(worker_id: int) -> None:
    """The DataLoader's worker_init_fn on a CPU: the decoding worker lowers its own priority to the
    lowest. There the model is the bottleneck and runs one thread per core: a decoding worker at normal
    priority preempts one of those threads and the others wait for it at their next barrier. At the
    lowest priority it decodes in the cycles the model leaves (and whenever the model waits for it);
    docs/results.md has the measurement (bench/extract.py)."""
    with contextlib.suppress(OSError):
        os.nice(19)


@contextlib.contextmanager
def cuda_settings(device: torch.device, precision: str) -> Iterator[None]:
    """On a GPU: cuDNN picks its fastest convolution for the (fixed) batch shape, and `fp32` means
    fp32 -- torch lets cuDNN convolutions run in TF32 by default (10 bits of mantissa, about 1e-3
    relative). Restored afterwards: these are process-wide switches."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32
    cudnn.benchmark = True
    if precision == "fp32":
        cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


class Throughput:
    """Images per second in steady state: over the second half of the batches' images. Timing from
    the first batch on is not enough: the DataLoader's workers prefetch two batches each while the
    model starts, and with many workers (a GPU machine) those are a large share of a run that such a
    timing would count as free (docs/results.md)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        """(time, images so far) after each batch."""

    def add(self, images: int) -> None:
        self.marks.append((time.monotonic(), images + (self.marks[-1][1] if self.marks else 0)))

    def steady(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        total = self.marks[-1][1]
        half = next(i for i, (_, n) in enumerate(self.marks) if n >= total / 2)
        (t0, n0), (t1, n1) = self.marks[min(half, len(self.marks) - 2)], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


def _forward(backbone: Backbone, forward: Forward, batch: torch.Tensor, tta: str, device: torch.device) -> np.ndarray:
    """(B, 3, H, W) uint8 to (B, V, dim) float32 embeddings of every test-time view."""
    x = apply_views(batch.to(device, non_blocking=True), tta)  # views commute with the normalisation
    emb = forward(x).float()
    return emb.view(len(VIEWS[tta]), len(batch), -1).transpose(0, 1).cpu().numpy()


@dataclass
class _Pending:
    """Results of the batches since the last journal write."""

    ids: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    views: dict[str, tuple[list[str], list[np.ndarray]]] = field(default_factory=dict)
    """backbone -> (image ids, per-batch (B, V, dim) arrays)."""

    def __len__(self) -> int:
        return len(self.ids) + len(self.failed)

    def add(self, backbone: str, ids: list[str], views: np.ndarray) -> None:
        got_ids, arrays = self.views.setdefault(backbone, ([], []))
        got_ids.extend(ids)
        arrays.append(views)

    def chunk(self) -> Chunk:
        """As a journal chunk: per backbone the (n, dim) mean of the views, and the views if several."""
        chunk = Chunk(ids=self.ids, sha256=self.sha256, failed=self.failed)
        for name, (ids, arrays) in self.views.items():
            views = np.concatenate(arrays)
            chunk.embeddings[name] = (ids, views.mean(axis=1), views if views.shape[1] > 1 else None)
        return chunk
