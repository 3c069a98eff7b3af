"""python cli.py <command> ...: the toolkit's one entry point. It parses arguments and calls the packages.

Commands: `backbones` (what can embed images), `extract` (images to a feature store), `fit` (a tuned
head and its report), `evaluate` (a run on its test rows or another store), `predict` (new images),
`finetune` (the backbone's top blocks trained with the head).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extract.run import Summary


def _use_project_venv() -> None:
    """`python cli.py` run by a Python without the dependencies re-runs itself in the project's .venv
    (made by `make demo` / `make test` / `make venv`), so the documented commands work as written."""
    if importlib.util.find_spec("torch") and importlib.util.find_spec("h5py"):
        return
    venv = Path(__file__).resolve().parent / ".venv" / "bin" / "python"
    if venv.is_file() and Path(sys.prefix).resolve() != venv.parent.parent.resolve():
        os.execv(str(venv), [str(venv), str(Path(__file__).resolve()), *sys.argv[1:]])
    sys.exit("error: the dependencies are not installed; run `make venv` (or `pip install -e .`) first")


if __name__ == "__main__":
    _use_project_venv()

import numpy as np

from features.store import FeatureStore

# Each command imports its own modules (in its cmd_ function and its arguments' function), so that
# `fit` and `evaluate` of linear and XGBoost heads start without torch: 0.5 GB resident less, which is
# what lets a store larger than memory be fitted within a small budget (classify/heads.py).

USER_ERRORS = {
    "extract.manifest": ("ManifestError",),
    "extract.backbones": ("BackboneError", "WeightsUnavailable"),
    "features.store": ("StoreError",),
    "extract.run": ("ConfigError",),
    "features.splits": ("SplitError",),
    "classify.fit": ("FitError",),
    "classify.heads": ("HeadError",),
    "classify.runs": ("RunError",),
    "classify.finetune": ("FinetuneError",),
}
"""Errors caused by input or options: printed as one clear message, exit status 2, no traceback.
By module and name: a module that was never imported cannot have raised its error."""


def _user_error(exc: BaseException) -> bool:
    return any(
        isinstance(exc, getattr(sys.modules[module], name))
        for module, names in USER_ERRORS.items()
        if module in sys.modules
        for name in names
    )


def cmd_backbones(args: argparse.Namespace) -> int:
    from extract.backbones import REGISTRY, TORCHVISION_PREFIX

    print(f"{'backbone':<20} {'dim':>5} {'input':>6}  {'default weights':<66} present")
    for name, family in REGISTRY.items():
        present = "yes" if family.weights_present() else f"no ({family.default_file()})"
        print(f"{name:<20} {family.dim:>5} {family.preprocess.crop:>4}px  {family.default_weights:<66} {present}")
    print(
        f"\nAny torchvision classification model also works as {TORCHVISION_PREFIX}<name>, e.g. "
        f"{TORCHVISION_PREFIX}convnext_tiny (its DEFAULT weights, recorded by exact name)."
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from extract.run import ExtractConfig, extract
    from extract.shards import distributed, extract_sharded

    cfg = ExtractConfig(**{k: v for k, v in vars(args).items() if k in ExtractConfig.__dataclass_fields__})
    summary = extract_sharded(cfg) if distributed() else extract(cfg)
    if summary is None:  # a torchrun rank other than 0: rank 0 reports the store
        return 0
    print(describe(summary))
    return 1 if cfg.strict and summary.failed else 0


def cmd_fit(args: argparse.Namespace) -> int:
    from classify.fit import FitConfig, fit
    from classify.report import headline

    cfg = FitConfig(**{k: v for k, v in vars(args).items() if k in FitConfig.__dataclass_fields__})
    metrics = fit(cfg)
    if not metrics:  # --no-report
        return 0
    print(headline(metrics))
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from classify.predict import evaluate_run

    metrics = evaluate_run(args.run, args.features, args.label_map, args.memory_budget)
    where = "test rows" if args.features is None else args.features
    print(
        f"{args.run} on {where}: balanced accuracy {metrics['balanced_accuracy']:.3f}, AUC {metrics['auc']:.3f}, "
        f"n={metrics['n']} ({metrics['lesions']} lesions); metrics in {Path(args.run) / 'evaluations'}"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from classify.fit import predictions_csv
    from classify.predict import predict

    result = predict(args.run, args.images, args.batch_size, args.workers, args.device)
    Path(args.out).write_text(
        predictions_csv(np.array(result.ids, dtype=object), result.proba, result.classes, predicted=True)
    )
    print(f"wrote {args.out}: {len(result.ids)} images classified")
    if result.failed:
        print(f"{len(result.failed)} images could not be used:")
        for image_id, reason in result.failed.items():
            print(f"  {image_id}: {reason}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from classify.finetune import FinetuneConfig, finetune
    from classify.report import headline

    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__})
    metrics = finetune(cfg)
    print(headline(metrics))
    print(f"report: {Path(cfg.out) / 'report.md'}")
    return 0


def describe(summary: "Summary", max_failures: int = 20) -> str:
    """What an extraction wrote: rows, labels, each backbone's provenance, this run's work, failures."""
    store = FeatureStore(summary.store)
    samples = store.samples()
    labels = Counter(label for label in samples.label if label)
    lines = [
        f"wrote {summary.store}: {len(samples)} rows, {sum(labels.values())} labelled "
        f"({', '.join(f'{k} {v}' for k, v in labels.most_common()) or 'no labels'}), "
        f"{len(set(samples.group))} groups, {len(store.failed())} failed"
    ]
    for name in store.backbones:
        a = store.backbone_attrs(name)
        random = "  RANDOM INIT (--weights none)" if a.get("random_init") else ""
        lines.append(
            f"  {name}: {a['dim']}-d, {int(store.done(name).sum())}/{len(samples)} rows done, "
            f"weights {a['weights']}, {a['input_size']} px, {a['precision']}, views {a['views']}, "
            f"fingerprint {a['fingerprint']}{random}"
        )
    embedded = ", ".join(f"{n} {k}" for n, k in summary.embedded.items())
    speed = summary.steady_images_per_s
    steady = f" ({speed:.1f} images/s after the first batch)" if speed else ""
    lines.append(f"this run: embedded {embedded} in {summary.seconds:.1f} s{steady}")
    if summary.failed:
        lines.append(f"{len(summary.failed)} images of this data set could not be used (kept under /failed):")
        lines += [f"  {i}: {reason}" for i, reason in list(summary.failed.items())[:max_failures]]
        if len(summary.failed) > max_failures:
            lines.append(f"  ... and {len(summary.failed) - max_failures} more")
    return "\n".join(lines)


COMMANDS: dict[str, tuple[str, object, object, bool]] = {}
"""name -> (help, cmd function, arguments function, whether --help shows defaults)."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command, with the options of `command` only (or of none: the top-level help needs none),
    so that each command imports just its own modules."""
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, func, arguments, defaults) in COMMANDS.items():
        formatter = argparse.ArgumentDefaultsHelpFormatter if defaults else argparse.HelpFormatter
        sub = commands.add_parser(name, help=help_text, formatter_class=formatter)
        sub.set_defaults(func=func)
        if name == command and arguments is not None:
            arguments(sub)
    return parser


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    from extract.preprocess import VIEWS
    from extract.run import COMPILE_FROM, ExtractConfig
    from extract.runtimes import ALL_PRECISIONS, RUNTIMES

    d = ExtractConfig()
    parser.add_argument(
        "--data", required=True, help="class-folder tree, CSV manifest, HAM10000_metadata.csv or ISIC one-hot CSV"
    )
    parser.add_argument("--images", default=d.images, help="folder that CSV paths and bare image ids are relative to")
    parser.add_argument("--backbone", required=True, help="backbone name(s), comma-separated (see `backbones`)")
    parser.add_argument(
        "--weights", default=d.weights, help="default | none (random, tests only) | FILE; comma-separated per backbone"
    )
    parser.add_argument("--out", default=d.out, help="feature store to write or extend")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per batch (0: per device)")
    parser.add_argument("--workers", type=int, default=d.workers, help="decoding processes (-1: per machine)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default=d.precision, choices=["auto", *ALL_PRECISIONS],
                        help="int8: OpenVINO only, calibrated on the data set's first 300 images")  # fmt: skip
    parser.add_argument("--tta", default=d.tta, choices=list(VIEWS), help="test-time views: flip = 2, d8 = 8")
    parser.add_argument("--runtime", default=d.runtime, choices=["auto", *RUNTIMES],
                        help="auto: OpenVINO on CPUs where it is installed, else torch")  # fmt: skip
    parser.add_argument(
        "--compile",
        default=d.compile,
        choices=["auto", "on", "off"],
        help="torch runtime: compile the backbones ahead of time, cached for later runs (auto: on CPUs when "
        f"cached or from {COMPILE_FROM} images; eager if it fails)",
    )
    parser.add_argument(
        "--flush-rows", type=int, default=d.flush_rows, help="rows per journal file (work lost to a crash)"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any image could not be used")
    parser.add_argument("--overwrite", action="store_true", help="replace embeddings made with other settings")


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    from classify.fit import PROTOCOLS, FitConfig
    from classify.heads import HEADS
    from classify.inputs import VIEW_MODES

    f = FitConfig()
    parser.add_argument("--features", required=True, help="feature store (FILE.h5) from `extract`")
    parser.add_argument("--head", required=True, help=f"one of: {', '.join(HEADS)}")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument(
        "--backbone",
        default=f.backbone,
        help="backbone(s) of the store, comma-separated (concatenated); default: its only one",
    )
    parser.add_argument(
        "--trials", type=int, default=f.trials, help="trials this process adds to the study (0: only the report)"
    )
    parser.add_argument("--no-report", dest="report", action="store_false",
                            help="a worker of a shared study: add trials only (`--trials 0` reports)")  # fmt: skip
    parser.add_argument("--heartbeat", type=int, default=f.heartbeat,
                            help="seconds between heartbeats in a database storage")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=f.timeout, help="stop starting trials after S seconds")
    parser.add_argument("--n-jobs", type=int, default=f.n_jobs, help="trials run in parallel threads")
    parser.add_argument(
        "--storage", default=f.storage, help="Optuna storage URL (default: a journal file in the run folder)"
    )
    parser.add_argument(
        "--study", default=f.study, help="study name (resume it; default: derived from store, inputs, split, head)"
    )
    parser.add_argument("--folds", type=int, default=f.folds, help="grouped cross-validation folds of the study rows")
    parser.add_argument(
        "--test-fraction", type=float, default=f.test_fraction, help="share of lesions kept for the test"
    )
    parser.add_argument("--seed", type=int, default=f.seed, help="seeds the split, the sampler and the heads")
    parser.add_argument(
        "--views", default=f.views, choices=list(VIEW_MODES), help="mean of the test-time views, or all of them"
    )
    parser.add_argument(
        "--meta", default=f.meta, help="metadata columns to add, comma-separated (e.g. age,sex,localization)"
    )
    parser.add_argument(
        "--positive", default=f.positive, help="class for sensitivity at fixed specificity (default: mel/melanoma)"
    )
    parser.add_argument("--device", default=f.device, help="auto | cpu | cuda for the MLP and XGBoost heads")
    parser.add_argument("--memory-budget", default=f.memory_budget,
                            help="embeddings larger than this are streamed from the store in blocks (1GB, 800MB, "
                                 "or a share of this machine's memory: 50%%)")  # fmt: skip
    parser.add_argument("--protocol", default=f.protocol, choices=list(PROTOCOLS),
                            help="score trials by grouped K-fold cv or by fold 0 alone (holdout); auto: holdout "
                                 "when streamed")  # fmt: skip


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from classify.inputs import MEMORY_BUDGET

    parser.add_argument("--run", required=True, help="run folder from `fit`")
    parser.add_argument(
        "--features", default=None, help="another feature store (external validation); default: the run's test rows"
    )
    parser.add_argument(
        "--label-map", default="", help="store_label=run_label,... when the stores name classes differently"
    )
    parser.add_argument("--memory-budget", default=MEMORY_BUDGET,
                    help="embeddings larger than this are scored block by block (1GB, 800MB, 50%%)")  # fmt: skip


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    from extract.run import ExtractConfig

    d = ExtractConfig()
    parser.add_argument("--run", required=True, help="run folder from `fit`")
    parser.add_argument(
        "--images", required=True, nargs="+", help="image files, folders of images, or one manifest CSV"
    )
    parser.add_argument(
        "--out", default="predictions.csv", help="ISIC-style CSV of probabilities and the predicted class"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per batch (0: per device)")
    parser.add_argument("--workers", type=int, default=d.workers, help="decoding processes (-1: per machine)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from extract.preprocess import VIEWS
    from extract.run import PRECISIONS
    from classify.finetune import FinetuneConfig

    t = FinetuneConfig()
    parser.add_argument("--data", required=True, help="the images, as for `extract`")
    parser.add_argument("--images", default=t.images, help="folder that CSV paths and bare image ids are relative to")
    parser.add_argument("--backbone", required=True, help="backbone name (see `backbones`)")
    parser.add_argument("--weights", default=t.weights, help="default | none | FILE (with --init: the run's own)")
    parser.add_argument(
        "--init", default=t.init, help="a `fit` run (linear or mlp head on this backbone) to start from"
    )
    parser.add_argument("--features", default=t.features, help="store whose split to use (default: --init's store)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--unfreeze", default=t.unfreeze, help="blocks trained, counted from the top, or 'all'")
    parser.add_argument("--epochs", type=int, default=t.epochs)
    parser.add_argument("--patience", type=int, default=t.patience, help="epochs without a better validation score")
    parser.add_argument("--batch-size", type=int, default=t.batch_size)
    parser.add_argument("--lr", type=float, default=t.lr, help="head's rate (default: 3e-5 with --init, 1e-3 without)")
    parser.add_argument("--backbone-lr", type=float, default=t.backbone_lr, help="learning rate of the unfrozen blocks")
    parser.add_argument("--weight-decay", type=float, default=t.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=t.warmup_epochs)
    parser.add_argument(
        "--ema", type=float, default=t.ema, help="decay per step of the weights' moving average (0: off)"
    )
    parser.add_argument("--mixup", type=float, default=t.mixup, help="mixup alpha (0: off)")
    parser.add_argument("--label-smoothing", type=float, default=t.label_smoothing)
    parser.add_argument(
        "--bn", default=t.bn, choices=["train", "frozen"], help="batch-norm statistics of unfrozen blocks"
    )
    parser.add_argument("--test-fraction", type=float, default=t.test_fraction, help="split recipe without a store")
    parser.add_argument("--folds", type=int, default=t.folds, help="split recipe without a store")
    parser.add_argument("--seed", type=int, default=t.seed)
    parser.add_argument("--workers", type=int, default=t.workers, help="decoding processes (-1: per machine)")
    parser.add_argument("--device", default=t.device)
    parser.add_argument("--precision", default=t.precision, choices=["auto", *PRECISIONS])
    parser.add_argument("--positive", default=t.positive)
    parser.add_argument("--tta", default=t.tta, choices=list(VIEWS), help="test-time views of the final embeddings")
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="keep the chosen epoch's model instead of training again on all study rows")  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")


COMMANDS.update(
    {
        "backbones": ("list backbones, dims, input sizes, weight status", cmd_backbones, None, False),
        "extract": ("embed a data set with frozen backbones into a feature store", cmd_extract, _extract_arguments,
                    True),
        "fit": ("tune a head on a feature store with Optuna, test it once, write a run folder with a report", cmd_fit,
                _fit_arguments, True),
        "evaluate": ("score a run on its test rows, or on another labelled store", cmd_evaluate, _evaluate_arguments,
                     False),
        "predict": ("classify new images with a run", cmd_predict, _predict_arguments, False),
        "finetune": ("train the top blocks of a backbone with the head, from a fit run's head", cmd_finetune,
                     _finetune_arguments, True),
    }
)  # fmt: skip


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by a test harness)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _Format(logging.Formatter):
    """Plain messages; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"{record.levelname}: {text}" if record.levelno >= logging.WARNING else text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    handler = _StderrHandler()
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not _user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
