"""`torchrun ... cli.py extract`: one data set embedded by several processes, GPUs or machines.

The rows still to embed are cut into explicit, disjoint, contiguous shards, one per rank (not
DistributedSampler, which pads with duplicates). Each rank embeds its shard with the ordinary
single-process extraction into a store of its own, `OUT.shards/rank-K-of-N.h5`, which resumes from its
own journal when the job is killed and rerun, and is left alone once finished. When every rank is
done, rank 0 copies the shard stores into the output store (see docs/feature-store.md for why a copy
and not HDF5 virtual datasets), rows in manifest order, and removes the shards. Rank 0 holds the output
store's lock (features/lock.py) for the whole job, as a single-process extraction does for its run.

The process group (gloo on CPUs, NCCL on GPUs) is used only for barriers: ranks share no tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from extract.manifest import Manifest, read_manifest
from extract.run import (
    ExtractConfig,
    backbone_layouts,
    extract,
    plan_rows,
    refuse_other_settings,
    resolve_calibration,
)
from extract.summary import Summary
from features.lock import StoreLock
from features.store import Journal, journal_folder, journal_store

__all__ = ["BARRIER_TIMEOUT", "distributed", "extract_sharded", "rows_to_do", "shard_path"]

log = logging.getLogger("extract")

BARRIER_TIMEOUT = timedelta(hours=12)
"""How long a finished rank waits for the others: a failed rank ends the job sooner (torchrun stops
every rank when one fails), so this only has to outlast the slowest shard."""


def distributed() -> bool:
    """Started by torchrun (or another launcher setting WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.shards") / f"rank-{rank}-of-{world}.h5"


def rows_to_do(cfg: ExtractConfig, manifest: Manifest) -> np.ndarray:
    """Manifest rows some backbone still lacks in the output store (or whose file changed): the
    single-process extraction's own plan, read-only, so every rank computes the same. (With `auto`
    choices made, as that extraction makes them: unresolved, they changed the fingerprint.) No backbone
    is built for this: the fingerprints come from their specs."""
    cfg, _ = resolve_calibration(cfg.resolved(), manifest, whole=manifest)
    layouts = backbone_layouts(cfg)
    out = Path(cfg.out)
    refuse_other_settings(out, layouts, cfg.overwrite)
    plan = plan_rows(out, manifest, layouts, Journal(journal_folder(out)))
    needed = {plan.samples.image_id[r] for r in plan.rows()}
    return np.array([r for r, image_id in enumerate(manifest.image_id) if image_id in needed], dtype=np.int64)


def _rank_device(cfg: ExtractConfig, local_rank: int) -> str:
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return cfg.device if cfg.device != "auto" else "cpu"


def extract_sharded(cfg: ExtractConfig, manifest: Manifest | None = None) -> Summary | None:
    """This rank's part of a torchrun extraction; rank 0 returns the summary of the whole store."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = _rank_device(cfg, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    started = time.monotonic()
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=BARRIER_TIMEOUT)
    try:
        if device == "cpu":  # the machine's cores shared between the ranks on it
            cores = max(1, (os.cpu_count() or 1) // local_world)
            torch.set_num_threads(cores)
            if cfg.workers < 0:
                cfg = dataclasses.replace(cfg, workers=min(4, cores - 1))
        manifest = manifest or read_manifest(cfg.data, cfg.images)
        out = Path(cfg.out)
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
        # One writer per store, as in a single-process run: rank 0 takes the output store's lock before
        # any rank plans, and keeps it until the store is assembled. A second job or extract on --out
        # is refused at once (torchrun then stops the other ranks, waiting at the barrier), or with
        # --wait queued behind the first; and nothing else writes --out while rank 0 gathers the shards.
        with StoreLock(out, wait=cfg.wait) if rank == 0 else contextlib.nullcontext() as lock:
            dist.barrier()
            shard = np.array_split(rows_to_do(dataclasses.replace(cfg, device=device), manifest), world)[rank]
            path = shard_path(out, rank, world)
            if len(shard):
                path.parent.mkdir(parents=True, exist_ok=True)
                part = extract(dataclasses.replace(cfg, out=str(path), device=device), manifest.take(shard))
                log.info(
                    "rank %d/%d: %d images in its shard, %d embedded by this run",
                    rank,
                    world,
                    len(shard),
                    max(part.embedded.values(), default=0),
                )
            dist.barrier()
            summary = None
            if rank == 0:
                summary = _gather(dataclasses.replace(cfg, device=device), manifest, world, lock)
                summary.seconds = time.monotonic() - started
        dist.barrier()
        return summary
    finally:
        dist.destroy_process_group()


def _gather(cfg: ExtractConfig, manifest: Manifest, world: int, lock: StoreLock) -> Summary:
    """Rank 0, holding the output store's `lock`: the shard stores into the output store's journal,
    then the ordinary assembly (no backbone is built unless an image that failed is retried)."""
    out = Path(cfg.out)
    resolved, _ = resolve_calibration(cfg.resolved(), manifest, whole=manifest)
    layouts = backbone_layouts(resolved)
    journal = Journal(journal_folder(out))
    journal.start({layout.name: layout.attrs["fingerprint"] for layout in layouts}, cfg.overwrite)
    copied: dict[str, int] = {}
    for rank in range(world):
        path = shard_path(out, rank, world)
        if path.is_file():
            for name, n in journal_store(path, journal).items():
                copied[name] = copied.get(name, 0) + n
    # Everything is journalled now: this embeds nothing new (except retrying the images that failed)
    # and writes the store, rows in manifest order after the rows the store already had.
    summary = extract(cfg, manifest, lock=lock)
    summary.embedded = {name: n + copied.get(name, 0) for name, n in summary.embedded.items()}
    shutil.rmtree(shard_path(out, 0, world).parent, ignore_errors=True)
    return summary
