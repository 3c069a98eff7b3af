"""The network that fine-tuning trains and how it is optimised: the backbone with its top blocks
unfrozen, the head as a torch module (standardisation first), AdamW with its schedule, the moving
average of the weights, and one stage's model and optimisation state (`Training`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from classify.finetune.config import FinetuneConfig, FinetuneError
from classify.finetune.data import image_loader
from classify.heads import Head, LinearHead, MLPHead
from extract.backbones import Backbone, get_family, load_backbone
from extract.manifest import Manifest

__all__ = [
    "Model",
    "Standardize",
    "Training",
    "build_ema",
    "build_optimizer",
    "build_training",
    "embedding_stats",
    "head_file",
    "head_module",
    "lr_schedule",
    "shift_logits",
    "trainable_blocks",
]


class Standardize(nn.Module):
    """(x - mean) / scale with fixed statistics (those an MLP head was fitted with)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def head_module(head: Head | None, n_classes: int, stats: tuple[np.ndarray, np.ndarray] | None = None) -> nn.Module:
    """The classifier as a torch module, standardisation first (as the heads were fitted, which keeps
    the optimiser's steps well scaled): a fitted linear head (the same probabilities), a fitted MLP,
    or, without one, a zero-initialised linear layer on embeddings standardised with `stats`."""
    if head is None:
        mean, scale = stats
        linear = nn.Linear(len(mean), n_classes)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(Standardize(mean, scale), linear)
    if isinstance(head, LinearHead):
        weight, bias = head.coef_, head.intercept_
        if weight.shape[0] == 1:  # binary: logits (0, s) give softmax = (1 - sigmoid(s), sigmoid(s))
            weight, bias = np.vstack([np.zeros_like(weight), weight]), np.concatenate([[0.0], bias])
        linear = nn.Linear(weight.shape[1], n_classes)
        with torch.no_grad():
            linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
        return nn.Sequential(Standardize(head.mean_, head.scale_), linear)
    if isinstance(head, MLPHead):
        return nn.Sequential(Standardize(head.mean_, head.scale_), copy.deepcopy(head.model_))
    raise FinetuneError(f"--init: a {head.name} head cannot be fine-tuned; fit a linear or mlp head")


def head_file(module: nn.Sequential, classes: list[str], init: Head | None) -> Head:
    """The trained classifier as a saved-head object (the formats `fit` writes)."""
    standardize, inner = module
    if isinstance(inner, nn.Linear):
        head = LinearHead()
        head.coef_ = inner.weight.detach().double().numpy()
        head.intercept_ = inner.bias.detach().double().numpy()
    else:
        head = MLPHead(**init.get_params())
        head.model_ = inner.eval()
    head.mean_, head.scale_ = standardize.mean.double().numpy(), standardize.scale.double().numpy()
    head.classes_ = np.array(classes, dtype=object)
    return head


def shift_logits(head: nn.Module, offsets: np.ndarray) -> None:
    """Add the class offsets to the bias of the head's last linear layer: its argmax is then the
    decision rule chosen on validation (softmax(z + b) ranks classes as log p + b does)."""
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias.add_(torch.as_tensor(offsets, dtype=last.bias.dtype, device=last.bias.device))


class Model(nn.Module):
    """The backbone and the head as one module (the state-dict keys `backbone.` and `head.` that the
    checkpoints and best.pt hold)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).float())


def trainable_blocks(backbone: Backbone, unfreeze: str) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """(frozen modules, trainable blocks from the lowest to the top): the last `unfreeze` blocks of the
    registry's list, or all; each trainable block a list of modules (so that --lr-decay can rate it)."""
    blocks = get_family(backbone.name).blocks(backbone.module)
    if unfreeze == "all":
        n = len(blocks)
    else:
        try:
            n = int(unfreeze)
        except ValueError:
            raise FinetuneError(f"--unfreeze {unfreeze!r}: a number of blocks or 'all'") from None
        if not 1 <= n <= len(blocks):
            raise FinetuneError(f"--unfreeze {n}: {backbone.name} has {len(blocks)} blocks (1..{len(blocks)} or all)")
    return [m for group in blocks[: len(blocks) - n] for m in group], blocks[len(blocks) - n :]


def embedding_stats(
    backbone: Backbone, files: list[Path], device: torch.device, *, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the training images' embeddings: the standardisation of a fresh head."""
    module = backbone.module.to(device).eval()
    parts = []
    with torch.inference_mode():
        for batch in image_loader(files, backbone.preprocess.to_uint8, batch_size=batch_size):
            if batch.images is not None:
                x = backbone.preprocess.normalize(batch.images.to(device))
                parts.append(module(x).float().cpu().numpy())
    x = np.concatenate(parts)
    return x.mean(axis=0), x.std(axis=0) + 1e-6


def build_optimizer(model: Model, trainable: list[list[nn.Module]], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW; the backbone at a lower rate than the head, each unfrozen block below the top at
    `lr_decay` times the rate of the block above it; no weight decay on norms and biases."""
    rated = [
        ([p for m in block for p in m.parameters()], cfg.backbone_lr * cfg.lr_decay ** (len(trainable) - 1 - i))
        for i, block in enumerate(trainable)
    ]
    groups = []
    for params, lr in [*rated, (list(model.head.parameters()), cfg.lr)]:
        decay = [p for p in params if p.ndim > 1]
        rest = [p for p in params if p.ndim <= 1]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": rest, "lr": lr, "weight_decay": 0.0},
        ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def lr_schedule(cfg: FinetuneConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rates' factor per step: linear warm-up, then cosine decay to zero at the last step."""
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))

    return factor


def build_ema(model: Model, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """A moving average of every weight and buffer (torch's own), or None when --ema is 0."""
    if decay <= 0:
        return None
    multi_avg = torch.optim.swa_utils.get_ema_multi_avg_fn(decay)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=multi_avg, use_buffers=True)


@dataclass
class Training:
    """One stage's model and optimisation state: what an epoch updates and a checkpoint holds."""

    backbone: Backbone
    model: Model
    frozen: list[nn.Module]
    """The blocks that stay frozen, in eval mode throughout (their batch-norm statistics kept)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: torch.optim.swa_utils.AveragedModel | None
    class_weight: torch.Tensor
    """Per class, rows / (classes x the class's rows) of the stage's rows: every class weighs alike."""
    rows: np.ndarray
    """The manifest's rows this stage trains on."""

    @property
    def scored(self) -> nn.Module:
        """What is validated, kept and saved: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def state(self) -> dict:
        """What a checkpoint holds of the stage (the keys `model`, `optimizer`, `scheduler`, `ema`)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        return {**state, **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load(self, state: dict) -> None:
        """Back to the state a checkpoint holds (`state()`'s keys)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_training(
    cfg: FinetuneConfig,
    weights: str,
    head: Head | None,
    *,
    manifest: Manifest,
    rows: np.ndarray,
    codes: np.ndarray,
    n_classes: int,
    device: torch.device,
) -> Training:
    """A stage's fresh start: the backbone with its top blocks unfrozen, the head (`head`, or a fresh one
    standardised on the rows' embeddings), class weights of `rows`, AdamW, the schedule, the average."""
    backbone = load_backbone(cfg.backbone, weights, cfg.backbone_options())
    frozen, trainable = trainable_blocks(backbone, cfg.unfreeze)
    for block in trainable:
        for module in block:
            for p in module.parameters():
                p.requires_grad_(True)
    stats = None
    if head is None:
        stats = embedding_stats(backbone, [manifest.file(r) for r in rows], device, batch_size=cfg.batch_size)
    model = Model(backbone.module, head_module(head, n_classes, stats))
    model.to(device, memory_format=torch.channels_last)
    counts = np.bincount(codes[rows], minlength=n_classes)
    class_weight = torch.tensor(len(rows) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    optimizer = build_optimizer(model, trainable, cfg)
    schedule = lr_schedule(cfg, math.ceil(len(rows) / cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Training(
        backbone=backbone,
        model=model,
        frozen=frozen,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=build_ema(model, cfg.ema),
        class_weight=class_weight,
        rows=rows,
    )
