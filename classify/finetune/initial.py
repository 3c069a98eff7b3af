"""What `--init RUN` brings to a fine-tuning, checked before any training: the run must be a single-view
head on this one backbone, made from the same weights and preprocessing, and its head is refitted on
the training rows only so that epoch 0 is scored as honestly as every later epoch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
from sklearn.base import clone

from classify.finetune.config import FinetuneConfig, FinetuneError
from classify.heads import Head
from classify.inputs import InputSpec, fit_views
from classify.runs import Run, recorded_options, weights_option
from extract.backbones import Backbone, BackboneOptions
from extract.manifest import Manifest
from features.rows import read_embeddings
from features.store import FeatureStore, describe_mismatch

__all__ = ["check_same_extraction", "init_options", "init_weights", "refit_without_validation"]


def init_weights(cfg: FinetuneConfig, init: Run | None) -> str:
    """The weights option to load; with --init, the run's own (and its inputs must be one backbone)."""
    if init is None:
        return cfg.weights
    inputs: InputSpec = init.inputs
    if inputs.backbones != (cfg.backbone,):
        raise FinetuneError(f"--init {cfg.init} was fitted on {', '.join(inputs.backbones)}, not {cfg.backbone}")
    if inputs.meta:
        raise FinetuneError(
            f"--init {cfg.init} uses metadata ({', '.join(inputs.meta)}); fine-tuning takes images only"
        )
    recorded = init.card["extraction"][cfg.backbone]
    if recorded.get("views") not in (None, "none"):
        raise FinetuneError(
            f"--init {cfg.init} was fitted on test-time views ({recorded['views']}); fit one on single views"
        )
    return weights_option(cfg.backbone, recorded, init.folder)


def init_options(cfg: FinetuneConfig, init: Run | None) -> FinetuneConfig:
    """`cfg` with the backbone options (--pool, --input-size, --clip-embed) resolved: with --init, the
    run's own, as its weights are (options given that differ from them are refused: the head was
    fitted on embeddings made that way)."""
    if init is None or cfg.backbone not in init.card["extraction"]:
        return cfg
    recorded = recorded_options(init.card["extraction"][cfg.backbone])
    given, default = cfg.backbone_options(), BackboneOptions()
    for option in ("pool", "input_size", "clip_embed"):
        mine = getattr(given, option)
        if mine != getattr(default, option) and mine != getattr(recorded, option):
            flag = "--" + option.replace("_", "-")
            raise FinetuneError(
                f"{flag} {mine}: --init {cfg.init} was fitted on embeddings made with {flag} "
                f"{getattr(recorded, option)}; leave {flag} out to use the run's"
            )
    return dataclasses.replace(cfg, pool=recorded.pool, input_size=recorded.input_size, clip_embed=recorded.clip_embed)


def refit_without_validation(init: Run, manifest: Manifest, train_rows: np.ndarray) -> Head:
    """The --init head refitted, with its tuned parameters, on the training rows only.

    `fit` refits its best head on all study rows, validation fold included; started from that head,
    epoch 0 would be scored on rows the head has seen and look better than it is, and checkpoint
    selection would favour it. Refitted on the frozen embeddings of the training rows, epoch 0 is
    the frozen pipeline scored as honestly as every later epoch.
    """
    store = FeatureStore(init.card["store"])
    samples = store.samples()
    row_of = {image_id: row for row, image_id in enumerate(samples.image_id)}
    rows = np.array([row_of[manifest.image_id[r]] for r in train_rows if manifest.image_id[r] in row_of])
    x = read_embeddings(store, init.inputs.backbones, all_views=init.inputs.all_views)[rows]
    y = np.array(samples.label, dtype=object)[rows]
    groups = np.array(samples.group, dtype=object)[rows]
    head = clone(init.head)
    fit_views(head, x, y, groups)
    return head


def check_same_extraction(backbone: Backbone, init: Run) -> None:
    """Same weights and preprocessing as the store the head was fitted on (precision may differ: it is
    not part of the identity)."""
    recorded = json.loads(init.card["extraction"][backbone.name]["identity"])
    mine = backbone.identity()
    recorded = {k: recorded.get(k) for k in mine}  # a setting this version no longer records cannot differ
    if recorded != mine:
        raise FinetuneError(
            f"--init {init.folder}: its {backbone.name} embeddings were made with other settings "
            f"({describe_mismatch(recorded, mine, names=('run', 'backbone'))})"
        )
