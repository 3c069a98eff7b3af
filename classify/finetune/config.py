"""The options of `cli.py finetune` with their defaults, the error it raises for what cannot work, and
the names of the files it keeps in the run folder."""

from __future__ import annotations

from dataclasses import dataclass

from extract.backbones import DEFAULT_OPTIONS, BackboneOptions

__all__ = [
    "BACKBONE_FILE",
    "BEST",
    "CHECKPOINT",
    "LATER_OPTIONS",
    "REFIT_CHECKPOINT",
    "STORE",
    "VALIDATION_FOLD",
    "FinetuneConfig",
    "FinetuneError",
]

LATER_OPTIONS = ("lr_decay", "pool", "input_size", "clip_embed")
"""Options added after checkpoints were first written: recorded in a checkpoint only when not at their
default, so that older checkpoints resume."""
CHECKPOINT = "checkpoint.pt"
"""The first stage's state after its last finished epoch: what `--resume` goes on from."""
REFIT_CHECKPOINT = "refit-checkpoint.pt"
"""The refit's state after its last finished epoch."""
BEST = "best.pt"
"""The scored weights of the epoch validation chose so far (a plain state dict)."""
BACKBONE_FILE = "backbone.pt"
"""The final backbone's state dict, loadable by `extract --weights`."""
STORE = "embeddings.h5"
"""The data set embedded by the final backbone: the store the run's test figures come from."""
VALIDATION_FOLD = 0
"""The fold of the study rows that picks the epoch; the other folds are trained on."""


class FinetuneError(ValueError):
    """Options or inputs that cannot work; raised before training, or a fault said clearly."""


@dataclass
class FinetuneConfig:
    """Every option of `cli.py finetune` and its default: the one place these defaults live."""

    data: str = ""
    images: str | None = None
    backbone: str = ""
    weights: str = "default"
    pool: str = DEFAULT_OPTIONS.pool
    input_size: int = DEFAULT_OPTIONS.input_size
    clip_embed: str = DEFAULT_OPTIONS.clip_embed
    """How the backbone embeds (`extract --pool/--input-size/--clip-embed`; with --init, the run's own)."""
    init: str | None = None
    """A `fit` run with a linear or mlp head on this backbone: the head to start from."""
    features: str | None = None
    """A feature store whose split to use (default: --init's store, else the split made again)."""
    out: str = ""
    unfreeze: str = "all"
    """How many blocks, counted from the top, are trained; `all` for the whole backbone."""
    epochs: int = 12
    patience: int = 6
    batch_size: int = 32
    lr: float | None = None
    """Learning rate of the head; default 3e-5 when it starts from --init's tuned head (below the
    backbone's: see docs/evaluation.md), 1e-3 for a fresh head (above it)."""
    backbone_lr: float = 1e-4
    """Learning rate of the unfrozen backbone blocks (of the top one, with --lr-decay)."""
    lr_decay: float = 1.0
    """Layer-wise learning-rate decay: the k-th unfrozen block below the top trains at backbone_lr x
    lr_decay^k (1: one rate for all). Lower blocks hold more general features, which fine-tuning
    should move less (the recipe of BEiT and DINOv2's fine-tuning of ViTs)."""
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    bn: str = "frozen"
    """Batch-norm statistics of the unfrozen blocks: `train` (they adapt to the data) or `frozen`."""
    test_fraction: float = 0.2
    folds: int = 5
    allow_small_test: bool = False
    """Go on when the test part holds fewer than MIN_TEST_LESIONS lesions of a class (figures marked)."""
    seed: int = 0
    workers: int = -1
    device: str = "auto"
    precision: str = "auto"
    positive: str | None = None
    ema: float = 0.99
    """Decay per step of an exponential moving average of the weights, which is what is validated and
    kept (0: off). It smooths the noisy steps of a small data set."""
    mixup: float = 0.2
    """Alpha of mixup's Beta(alpha, alpha) mixing of image pairs and their labels (0: off)."""
    label_smoothing: float = 0.1
    tta: str = "d8"
    """Test-time views of the final embeddings (the run's store, and `predict`): none, flip or d8. d8
    (the mean embedding of the 8 flips and rotations, which training showed the network as
    augmentations) by default: the network learnt to answer alike under these symmetries, so their
    mean is a steadier embedding, and the cost falls on the final embedding only, never on the
    epochs (docs/ has the measured gain and time)."""
    refit: bool = True
    """Once validation has picked the number of epochs, train again from the start on every study row
    (validation fold included) for that many epochs: the final model, as `fit` refits its best head
    on all study rows. Its validation figures are the chosen epoch's, made before the refit."""
    resume: bool = False

    def backbone_options(self) -> BackboneOptions:
        """--pool, --input-size and --clip-embed as the backbone takes them."""
        try:
            return BackboneOptions(pool=self.pool, input_size=self.input_size, clip_embed=self.clip_embed)
        except ValueError as exc:  # BackboneError: said as finetune's own error, in one line
            raise FinetuneError(str(exc)) from None
