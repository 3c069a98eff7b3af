"""`cli.py finetune`: the optional last stage. Unfreeze the top blocks of the backbone and train them
with the head, starting from what the study found (`--init RUN`).

Honest by construction: the split is the store's (or the same recipe made again from the same rows),
the test rows are never trained or early-stopped on, and fold 0 of the study rows is the lesion-grouped
validation part that picks the epoch. The result is a run folder like `fit`'s: the fine-tuned backbone
(`backbone.pt`, loadable by `extract --weights`), a head file, a store of fine-tuned embeddings
(`embeddings.h5`), and the report. The test figures come from that store through the same code as
`predict`, so `predict --run` reproduces them.

By default batch normalisation keeps its running statistics in every block, unfrozen ones included
(their scale and shift still train; `--bn train` lets the unfrozen blocks' statistics adapt): the head
starts from embeddings computed with those statistics, and batch statistics of 32 images move every
embedding at the first step, so a tuned head would first lose much of what it knew (its training loss
rises well above where it started) before the network adapts.

Two stages: training on folds 1..K-1 with fold 0 validated after every epoch picks the number of
epochs; then (`--refit`, the default) the same training runs again from the start on every study row
for that many epochs and is the final model, as `fit` refits its best head on all study rows.

Faults: a checkpoint after every epoch of either stage (written to a temporary file, then renamed);
`--resume` goes on from it, and because every epoch's randomness is seeded from (seed, epoch), a
resumed run equals an uninterrupted one up to the nondeterminism of the kernels.

The modules, each used only through its public names:

- `config`: the options (`FinetuneConfig`), `FinetuneError`, the run folder's file names;
- `data`: the split mapped onto the manifest, augmentation, the loaders (`extract.dataset`'s images);
- `model`: the network (backbone + standardised head), its optimiser, schedule and moving average,
  and one stage's training state (`Training`);
- `initial`: what `--init` brings, and its checks;
- `loop`: one training epoch, one validation score;
- `checkpoint`: `Checkpoint`, the atomic save and the checks before going on from a file;
- `stages`: the first stage, the refit, and `finetune` that runs them;
- `results`: the only writer of the run folder.
"""

from classify.finetune.config import FinetuneConfig, FinetuneError
from classify.finetune.stages import finetune

__all__ = ["FinetuneConfig", "FinetuneError", "finetune"]
