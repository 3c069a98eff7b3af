"""skinlesion <command> (or python cli.py <command>): the one entry point; it parses arguments, calls the packages.

Commands: `backbones` (what can embed images), `extract` (images to a feature store), `fit` (a tuned
head and its report), `evaluate` (a run on its test rows or another store), `predict` (new images),
`compare` (runs on the same test rows, paired), `audit` (duplicates and leaks in a store), `finetune` (the
backbone's top blocks trained with the head).
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import logging
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, NoReturn


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

from features.splits import MIN_TEST_LESIONS

# Each command imports its own modules (in its cmd_ function and its arguments' function), so that
# `fit` and `evaluate` of linear and XGBoost heads start without torch: 0.5 GB resident less, which is
# what lets a store larger than memory be fitted within a small budget (classify/heads.py).

USER_ERRORS = {
    "extract.manifest": ("ManifestError",),
    "extract.backbones": ("BackboneError", "WeightsUnavailable"),
    "features.store": ("StoreError",),
    "extract.run": ("ConfigError",),
    "extract.runtimes": ("RuntimeUnavailable",),
    "features.splits": ("SplitError",),
    "classify.fit": ("FitError",),
    "classify.heads": ("HeadError",),
    "classify.runs": ("RunError",),
    "classify.study": ("StudyError",),
    "classify.finetune": ("FinetuneError",),
    "classify.audit": ("AuditError",),
    "classify.embedding_map": ("MapError",),
    "classify.explain": ("ExplainError",),
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
    from extract.backbones import OPEN_CLIP_PREFIX, REGISTRY, TIMM_PREFIX, TORCHVISION_PREFIX

    if args.search is not None:
        return _search_backbones(args.search)
    print(f"{'backbone':<20} {'dim':>5} {'input':>6}  {'default weights':<66} present")
    for name, family in REGISTRY.items():
        present = "yes" if family.weights_present() else f"no ({family.default_file()})"
        print(f"{name:<20} {family.dim:>5} {family.preprocess.crop:>4}px  {family.default_weights:<66} {present}")
    clip = "installed" if importlib.util.find_spec("open_clip") else "not installed: pip install -e '.[clip]'"
    print(
        "\nFamilies, named with a prefix (default weights recorded by exact name):\n"
        f"  {TORCHVISION_PREFIX}<name>  any torchvision classification model, e.g. {TORCHVISION_PREFIX}convnext_tiny\n"
        f"  {TIMM_PREFIX}<name>[.<tag>]  any timm model, e.g. {TIMM_PREFIX}vit_small_patch14_dinov2.lvd142m, "
        f"{TIMM_PREFIX}convnext_tiny.fb_in22k, {TIMM_PREFIX}hf-hub:ORG/REPO\n"
        f"  {OPEN_CLIP_PREFIX}<arch>/<pretrained>  an OpenCLIP image tower, e.g. {OPEN_CLIP_PREFIX}ViT-B-32/openai, "
        f"{OPEN_CLIP_PREFIX}hf-hub:ORG/REPO (open-clip-torch {clip})\n"
        "timm and OpenCLIP weights come from the Hugging Face cache ($HF_HOME/hub), downloaded when missing. "
        "extract --pool, --input-size and --clip-embed set how they embed; `backbones --search WORD` lists "
        "the pretrained models whose names contain WORD."
    )
    return 0


def _search_backbones(word: str) -> int:
    """`backbones --search WORD`: matching pretrained timm (and OpenCLIP) models, from their configs."""
    from features.store import license_caveat
    from extract.hub import SEARCH_SIZES_UP_TO, search

    rows = search(word)
    if not rows:
        print(f"no pretrained timm or OpenCLIP model has {word!r} in its name")
        return 0
    width = max(len(r.name) for r in rows)
    print(f"{'backbone':<{width}} {'dim':>5} {'input':>6}  {'licence':<28} cached")
    for r in rows:
        flag = " (!)" if license_caveat(r.license) else ""
        size = f"{r.size}px" if r.size else "?"
        licence = r.license + flag
        print(f"{r.name:<{width}} {r.dim or '?':>5} {size:>6}  {licence:<28} {'yes' if r.cached else 'no'}")
    if any(r.dim is None for r in rows):
        print(f"(dim ?: shown when the search matches at most {SEARCH_SIZES_UP_TO} architectures)")
    if any(license_caveat(r.license) for r in rows):
        print("(!) not an open licence (or none given): check its terms before any use beyond research")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from extract.run import ExtractConfig, extract
    from extract.shards import distributed, extract_sharded

    cfg = ExtractConfig(**{k: v for k, v in vars(args).items() if k in ExtractConfig.__dataclass_fields__})
    summary = extract_sharded(cfg) if distributed() else extract(cfg)
    if summary is None:  # a torchrun rank other than 0: rank 0 reports the store
        return 0
    print(summary.describe())
    share = len(summary.failed) / max(summary.images, 1)
    if share > cfg.max_failed:
        return 1
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
    print(f"report.html: {Path(cfg.out) / 'report.html'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from classify.predict import evaluate_run

    metrics = evaluate_run(
        args.run,
        args.features,
        args.label_map,
        args.memory_budget,
        args.subgroups,
        fmt=args.format,
        near_duplicates=args.near_duplicates,
    )
    where = "test rows" if args.features is None else args.features
    if metrics.get("warning"):
        print(f"WARNING: {metrics['warning']}")
    print(
        f"{args.run} on {where}: balanced accuracy {metrics['balanced_accuracy']:.3f}, AUC {metrics['auc']:.3f}, "
        f"n={metrics['n']} ({metrics['lesions']} lesions); report: {Path(metrics['folder']) / 'report.md'}"
    )
    print(f"report.html: {Path(metrics['folder']) / 'report.html'}")
    for reason, n in metrics["excluded"].items():
        print(f"  left out, seen by the run: {n} images {reason}")
    near = metrics.get("near_duplicates")
    if near:
        print(f"  scored apart: {near['images']} near-duplicates of training images (cosine >= {near['threshold']:g})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import json

    from classify.compare import compare_runs, comparison_markdown

    result = compare_runs(args.runs)
    text = comparison_markdown(result)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(text, end="")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from classify.audit import audit, audit_lines, default_out, write_audit

    result = audit(args.features, backbone=args.backbone, threshold=args.threshold)
    out = write_audit(result, args.out or default_out(args.features))
    print("\n".join(audit_lines(result, out)))
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    from classify.embedding_map import caption, colouring, compute_map, write_map_png

    emap = compute_map(args.features, backbone=args.backbone, max_points=args.max_points, seed=args.seed)
    colours = colouring(args.features, emap, args.color, run=args.run)
    out = Path(args.out or Path(args.features).with_name(f"{Path(args.features).stem}-map-{args.color}.png"))
    write_map_png(emap, colours, out)
    print(f"{caption(emap, colours)}\nwrote {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from classify.isic import challenge_csv, challenge_for
    from classify.predict import predict
    from classify.ood import OOD_FILE
    from classify.runs import RunError, predictions_csv, read_card

    card = read_card(Path(args.run))
    challenge = challenge_for(args.format, [str(c) for c in card["classes"]])
    if args.abstain_ood and OOD_FILE not in card["files"]:
        raise RunError(
            f"--abstain-ood: {args.run} has no out-of-distribution description (a run of streamed embeddings, "
            "a fine-tuned run, or one made before there were any); fit it again, or drop the option"
        )
    if args.explain:
        from classify.explain import check_explainable
        from classify.runs import load_run

        check_explainable(load_run(args.run))  # refused before any image is embedded
    result = predict(args.run, args.images, args.batch_size, args.workers, args.device, args.root)
    ids = np.array(result.ids, dtype=object)
    decisions = result.decisions
    if args.abstain_ood:
        decisions = np.where(result.in_distribution, decisions.astype(object), "abstain").astype(object)
    if challenge is not None:  # the scorer's columns only: failed images are listed on stderr below
        Path(args.out).write_text(challenge_csv(challenge, ids, result.proba, result.classes))
    else:
        ood = {"ood_score": result.ood_score, "in_distribution": result.in_distribution} if result.has_ood else {}
        Path(args.out).write_text(predictions_csv(ids, result.proba, result.classes, decisions, result.failed, **ood))
    flagged = int(np.sum(~result.in_distribution))
    print(f"wrote {args.out}: {len(result.ids)} images classified, {len(result.failed)} could not be")
    if flagged:
        action = "decision abstain" if args.abstain_ood else "in_distribution false"
        print(f"  {flagged} look unlike the run's training images (out of distribution: {action})")
    if args.explain and result.ids:
        from classify.explain import explain, write_explanations

        skipped: dict[str, str] = {}
        explained = explain(args.run, args.images, device=args.device, root=args.root, failed=skipped)
        written = write_explanations(explained, args.explain)
        print(f"wrote {len(written)} explanations to {args.explain}")
        for image_id, reason in skipped.items():
            if image_id not in result.failed:  # an image predict could not read is listed below already
                print(f"  not explained: {image_id}: {reason}", file=sys.stderr)
    for image_id, reason in result.failed.items():
        print(f"  failed: {image_id}: {reason}", file=sys.stderr)
    if not result.ids:
        print(
            f"error: no image was classified (each input and its reason is listed above and in {args.out})",
            file=sys.stderr,
        )
        return 1
    return 1 if args.strict and result.failed else 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from classify.finetune import FinetuneConfig, finetune
    from classify.report import headline

    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__})
    metrics = finetune(cfg)
    print(headline(metrics))
    print(f"report: {Path(cfg.out) / 'report.md'}")
    print(f"report.html: {Path(cfg.out) / 'report.html'}")
    return 0


@dataclass(frozen=True)
class Command:
    """One command of the command line: its help, what runs it, its options, and one example."""

    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None
    example: str


COMMANDS: dict[str, Command] = {}


class _Parser(argparse.ArgumentParser):
    """A mistake on the command line is one line (the option and what it takes) and exit status 2, not
    argparse's usage block: the line is what a user reads."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's default once, where it tells something: not for flags (True/False), not for options
    without one (None), not where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag_or_none = default is None or isinstance(default, bool) or default in ("", argparse.SUPPRESS)
        if flag_or_none or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser(command: str | None = None, prog: str = "cli.py") -> argparse.ArgumentParser:
    """Every command, with the options of `command` only (or of none: the top-level help needs none),
    so that each command imports just its own modules."""
    parser = _Parser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, spec in COMMANDS.items():
        sub = commands.add_parser(
            name, help=spec.help, description=spec.help, formatter_class=_Help, epilog=f"example:\n  {spec.example}"
        )
        sub.set_defaults(func=spec.run)
        if name == command and spec.arguments is not None:
            spec.arguments(sub)
    return parser


# ----------------------------------------------------------------------------------------- option types
# Each checks a value's range before any work, so that a mistake is one line naming the option.


def integer(low: int, high: int | None = None, *, also: tuple[int, ...] = (), auto: int | None = None):
    """An integer in [low, high] (or one of `also`); `auto` (when given) is the word "auto" as that value."""

    def parse(text: str) -> int:
        if auto is not None and text == "auto":
            return auto
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value in also or (value >= low and (high is None or value <= high)):
            return value
        allowed = f">= {low}" if high is None else f"from {low} to {high}"
        allowed += "".join(f" or {v}" for v in also) + (" or auto" if auto is not None else "")
        raise argparse.ArgumentTypeError(f"{value} is out of range: it takes a whole number {allowed}")

    parse.__name__ = "integer"
    return parse


def number(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False):
    """A number in the interval from low to high (each end open or closed)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if open_low else value < low
        above = high is not None and (value >= high if open_high else value > high)
        if below or above or value != value:
            left, right = "(" if open_low else "[", ")" if open_high else "]"
            span = f"in {left}{low:g}, {high:g}{right}" if high is not None else f"{'>' if open_low else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: it takes a number {span}")
        return value

    parse.__name__ = "number"
    return parse


def memory_budget(text: str) -> str:
    """--memory-budget: checked here (1GB, 800MB, 50%), passed on as written (the config records it)."""
    from features.rows import parse_budget

    try:
        ok = parse_budget(text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: write it as 1GB, 800MB or a share of this machine's memory: 50%")
    return text


BATCH = integer(1, auto=0)
WORKERS = integer(0, auto=-1)
FRACTION = number(0, 1, open_low=True, open_high=True)
"""A share strictly between 0 and 1 (a test part of none or of everything means nothing)."""


def _backbones_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--search",
        metavar="WORD",
        default=None,
        help="list the pretrained timm (and OpenCLIP) models whose names contain WORD, e.g. dinov2",
    )


def per_backbone(parse):
    """`parse` applied to one value, or to each of a comma-separated list of them (one per backbone)."""

    def parse_each(text: str):
        parts = [parse(part.strip()) for part in text.split(",")]
        return parts[0] if len(parts) == 1 else ",".join(str(p) for p in parts)

    parse_each.__name__ = parse.__name__
    return parse_each


def one_of(values: Iterable[str]):
    """One of `values`."""
    values = tuple(values)

    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose {', '.join(values)}")
        return text

    parse.__name__ = "choice"
    return parse


def _backbone_option_arguments(parser: argparse.ArgumentParser, *, several: bool) -> None:
    """--pool, --input-size and --clip-embed: how a hub backbone embeds. With `several` backbones (extract),
    each takes one value for all or one per backbone, comma-separated, as --weights does; finetune's
    one backbone takes the run's own with --init."""
    from extract.backbones import CLIP_EMBEDS, DEFAULT_OPTIONS, POOLS

    each = per_backbone if several else (lambda parse: parse)
    also = "; one for all backbones or one each, comma-separated" if several else " (with --init: the run's own)"
    parser.add_argument(
        "--pool",
        type=each(one_of(POOLS)),
        default=DEFAULT_OPTIONS.pool,
        help=f"timm: transformers: {', '.join(POOLS)} (the model's own, class token, mean patch token, or both "
        f"concatenated){also}",
    )
    parser.add_argument(
        "--input-size",
        type=each(integer(16, 4096, also=(0,))),
        default=DEFAULT_OPTIONS.input_size,
        help=f"timm: and open_clip: backbones: input side in pixels (0: the weights' own; DINOv2's is 518){also}",
    )
    parser.add_argument(
        "--clip-embed",
        type=each(one_of(CLIP_EMBEDS)),
        default=DEFAULT_OPTIONS.clip_embed,
        help="open_clip: backbones: the image tower's embedding before or after its projection "
        f"({', '.join(CLIP_EMBEDS)}){also}",
    )


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    from extract.decoding import DECODERS
    from extract.preprocess import VIEWS
    from extract.run import ExtractConfig
    from extract.runtimes import ALL_PRECISIONS, COMPILE_FROM, RUNTIMES

    d = ExtractConfig()
    parser.add_argument(
        "--data", required=True, help="class-folder tree, CSV manifest, HAM10000_metadata.csv or ISIC one-hot CSV"
    )
    parser.add_argument("--images", default=d.images, help="folder that CSV paths and bare image ids are relative to")
    parser.add_argument("--backbone", required=True, help="backbone name(s), comma-separated (see `backbones`)")
    parser.add_argument(
        "--weights", default=d.weights, help="default | none (random, tests only) | FILE; comma-separated per backbone"
    )
    _backbone_option_arguments(parser, several=True)
    parser.add_argument("--out", default=d.out, help="feature store to write or extend")
    parser.add_argument("--batch-size", type=BATCH, default="auto", help="images per batch, or auto (per device)")
    parser.add_argument("--workers", type=WORKERS, default="auto", help="decoding processes, or auto (per machine)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision",
        default=d.precision,
        choices=["auto", *ALL_PRECISIONS],
        help="int8: OpenVINO only, calibrated on the data set's first 300 images",
    )
    parser.add_argument("--tta", default=d.tta, choices=list(VIEWS), help="test-time views: flip = 2, d8 = 8")
    parser.add_argument(
        "--runtime",
        default=d.runtime,
        choices=["auto", *RUNTIMES],
        help="auto: OpenVINO on CPUs where it is installed, else torch",
    )
    parser.add_argument(
        "--decode",
        default=d.decode,
        choices=["auto", *DECODERS],
        help="JPEG decoding: pil (Pillow in the loader workers) or torch (torchvision: batches on a GPU with "
        "nvJPEG, in the workers on a CPU); auto: the store's own when --out has embeddings, else torch",
    )
    parser.add_argument(
        "--compile",
        default=d.compile,
        choices=["auto", "on", "off"],
        help="torch runtime: compile the backbones ahead of time, cached for later runs (auto: on CPUs when "
        f"cached or from {COMPILE_FROM} images; eager if it fails)",
    )
    parser.add_argument(
        "--flush-rows", type=integer(1), default=d.flush_rows, help="rows per journal file (work lost to a crash)"
    )
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any image could not be used")
    parser.add_argument(
        "--max-failed",
        type=number(0, 1),
        default=d.max_failed,
        help="exit with status 1 if more than this share of the images could not be used",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace embeddings made with other settings")
    parser.add_argument(
        "--wait", action="store_true", help="if another extract is writing --out, wait for it instead of refusing"
    )


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    from classify.calibration import CALIBRATIONS
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
        "--trials",
        type=integer(0),
        default=f.trials,
        help="trials this process adds to the study (0: only the report of what the study holds)",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="a worker of a shared study: add trials only (`--trials 0` reports)",
    )
    parser.add_argument(
        "--heartbeat", type=integer(1), default=f.heartbeat, help="seconds between heartbeats in a database storage"
    )
    parser.add_argument(
        "--timeout",
        type=number(0, open_low=True),
        default=f.timeout,
        help="stop starting trials after this many seconds (default: no limit)",
    )
    parser.add_argument(
        "--n-jobs",
        type=integer(1, also=(-1,)),
        default=f.n_jobs,
        help="trials run in parallel threads (-1: one per core)",
    )
    parser.add_argument(
        "--storage", default=f.storage, help="Optuna storage URL (default: a journal file in the run folder)"
    )
    parser.add_argument(
        "--study", default=f.study, help="study name (resume it; default: derived from store, inputs, split, head)"
    )
    parser.add_argument(
        "--folds", type=integer(2), default=f.folds, help="grouped cross-validation folds of the study rows"
    )
    parser.add_argument(
        "--test-fraction", type=FRACTION, default=f.test_fraction, help="share of lesions kept for the test, in (0, 1)"
    )
    parser.add_argument(
        "--allow-small-test",
        action="store_true",
        help=f"fit even if the test part holds fewer than {MIN_TEST_LESIONS} lesions of a class "
        "(every figure is then marked)",
    )
    parser.add_argument("--seed", type=int, default=f.seed, help="seeds the split, the sampler and the heads")
    parser.add_argument(
        "--views", default=f.views, choices=list(VIEW_MODES), help="mean of the test-time views, or all of them"
    )
    parser.add_argument(
        "--meta", default=f.meta, help="metadata columns to add, comma-separated (e.g. age,sex,localization)"
    )
    parser.add_argument(
        "--positive",
        default=f.positive,
        help="the positive class of the operating point and the clinical figures (default: mel/melanoma)",
    )
    parser.add_argument(
        "--operating-point",
        default=f.operating_point,
        metavar="RULE",
        help="the positive class's threshold, set on the out-of-fold predictions: sens=S, spec=S, youden or none "
        "(auto: sens=0.95 where there is a positive class)",
    )
    parser.add_argument(
        "--calibrate",
        default=f.calibrate,
        choices=list(CALIBRATIONS),
        help="calibration of the probabilities, fitted on the out-of-fold predictions",
    )
    parser.add_argument(
        "--malignant",
        default=f.malignant,
        metavar="CLASSES",
        help="classes counted malignant in the malignant-vs-benign figures of a multi-class run",
    )
    parser.add_argument(
        "--group-duplicates",
        type=number(0, 1),
        default=f.group_duplicates,
        metavar="T",
        help="merge the lesion groups of near-duplicates (cosine >= T; `audit` suggests T) before the split (0: off)",
    )
    parser.add_argument(
        "--subgroups",
        default=f.subgroups,
        metavar="COLUMNS",
        help="metadata columns (e.g. sex,age,localization) whose groups get their own test figures",
    )
    parser.add_argument(
        "--fractions",
        default=f.fractions,
        metavar="SHARES",
        help="label efficiency: also fit on these shares of the study lesions (e.g. 0.1,0.25,0.5,1), each a run "
        "under RUN/fractions/, scored on the same test rows; the report tabulates and plots them",
    )
    parser.add_argument("--device", default=f.device, help="auto | cpu | cuda for the MLP and XGBoost heads")
    parser.add_argument(
        "--memory-budget",
        type=memory_budget,
        default=f.memory_budget,
        help="embeddings larger than this are streamed from the store in blocks (1GB, 800MB, "
        "or a share of this machine's memory: 50%%)",
    )
    parser.add_argument(
        "--protocol",
        default=f.protocol,
        choices=list(PROTOCOLS),
        help="score trials by grouped K-fold cv or by fold 0 alone (holdout); auto: holdout when streamed",
    )


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (`fit` or `finetune`); the first is the reference"
    )
    parser.add_argument("--out", default=None, help="write the comparison as markdown to FILE.md too")
    parser.add_argument("--json", default=None, help="write every figure as JSON to FILE")


def _audit_arguments(parser: argparse.ArgumentParser) -> None:
    from features.duplicates import DEFAULT_THRESHOLD

    parser.add_argument("--features", required=True, help="the feature store to audit")
    parser.add_argument(
        "--backbone", default=None, help="whose embeddings are compared; needed only when the store holds several"
    )
    parser.add_argument(
        "--threshold",
        type=number(0, 1, open_low=True),
        default=DEFAULT_THRESHOLD,
        help="cosine similarity at or above which two images are near-duplicates, in (0, 1]",
    )
    parser.add_argument(
        "--out", default=None, help="folder for pairs.csv, clusters.csv, summary.md (default: <store stem>-audit/)"
    )


def _map_arguments(parser: argparse.ArgumentParser) -> None:
    from classify.embedding_map import COLOURINGS, MAX_POINTS

    parser.add_argument("--features", required=True, help="the feature store to map")
    parser.add_argument("--backbone", default=None, help="whose embeddings; needed only when the store holds several")
    parser.add_argument(
        "--color",
        default="label",
        metavar="|".join([*COLOURINGS, "COL"]),
        help="colour the points by label, by study/test side of the split, or by a metadata column",
    )
    parser.add_argument("--run", default=None, help="with --color split: that run's split (else the split fit makes)")
    parser.add_argument(
        "--max-points",
        type=integer(2),
        default=MAX_POINTS,
        help="map at most this many images (a sample stratified by label)",
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the sample of a larger store")
    parser.add_argument("--out", default=None, help="the PNG to write (default: <store stem>-map-<color>.png)")


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from features.duplicates import DEFAULT_THRESHOLD
    from features.rows import MEMORY_BUDGET

    parser.add_argument("--run", required=True, help="run folder from `fit` or `finetune`")
    parser.add_argument(
        "--features", default=None, help="another feature store (external validation); default: the run's test rows"
    )
    parser.add_argument(
        "--label-map", default="", help="store_label=run_label,... when the stores name classes differently"
    )
    parser.add_argument(
        "--subgroups",
        default="",
        metavar="COLUMNS",
        help="metadata columns of the store (e.g. fitzpatrick,sex) whose groups get their own figures",
    )
    parser.add_argument(
        "--near-duplicates",
        type=number(0, 1),
        default=DEFAULT_THRESHOLD,
        metavar="T",
        help="with --features: images whose embedding has cosine >= T to a training image are scored apart (0: off)",
    )
    _format_argument(parser)
    parser.add_argument(
        "--memory-budget",
        type=memory_budget,
        default=MEMORY_BUDGET,
        help="embeddings larger than this are scored block by block (1GB, 800MB, 50%%)",
    )


def _format_argument(parser: argparse.ArgumentParser) -> None:
    from classify.isic import FORMATS

    parser.add_argument(
        "--format",
        default="csv",
        choices=list(FORMATS),
        help="csv (probabilities, predicted, decision, error) or the columns an ISIC challenge's scorer reads: "
        "isic (the first challenge that takes the run's classes) or one by name",
    )


def _predict_arguments(parser: argparse.ArgumentParser) -> None:
    from extract.run import ExtractConfig

    d = ExtractConfig()
    parser.add_argument("--run", required=True, help="run folder from `fit` or `finetune`")
    parser.add_argument(
        "--images", required=True, nargs="+", help="image files, folders of images, or one manifest CSV"
    )
    parser.add_argument(
        "--root", default=None, help="folder a manifest CSV's paths and bare ids are relative to (default: the CSV's)"
    )
    parser.add_argument(
        "--out", default="predictions.csv", help="ISIC-style CSV of probabilities, the predicted class and failures"
    )
    _format_argument(parser)
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any image could not be used")
    parser.add_argument(
        "--abstain-ood",
        action="store_true",
        help="decision `abstain` for images out of the run's distribution (ood_score beyond its threshold)",
    )
    parser.add_argument(
        "--explain",
        default=None,
        metavar="DIR",
        help="also write DIR/<image id>.png: where the run looked (Grad-CAM, or occlusion for xgboost/knn heads)",
    )
    parser.add_argument("--batch-size", type=BATCH, default="auto", help="images per batch, or auto (per device)")
    parser.add_argument("--workers", type=WORKERS, default="auto", help="decoding processes, or auto (per machine)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from extract.preprocess import VIEWS
    from extract.runtimes import PRECISIONS
    from classify.finetune import FinetuneConfig

    t = FinetuneConfig()
    parser.add_argument("--data", required=True, help="the images, as for `extract`")
    parser.add_argument("--images", default=t.images, help="folder that CSV paths and bare image ids are relative to")
    parser.add_argument("--backbone", required=True, help="backbone name (see `backbones`)")
    parser.add_argument("--weights", default=t.weights, help="default | none | FILE (with --init: the run's own)")
    _backbone_option_arguments(parser, several=False)
    parser.add_argument(
        "--init", default=t.init, help="a `fit` run (linear or mlp head on this backbone) to start from"
    )
    parser.add_argument("--features", default=t.features, help="store whose split to use (default: --init's store)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument(
        "--unfreeze", type=_unfreeze, default=t.unfreeze, help="blocks trained, counted from the top, or 'all'"
    )
    parser.add_argument("--epochs", type=integer(1), default=t.epochs, help="most epochs of training")
    parser.add_argument(
        "--patience", type=integer(1), default=t.patience, help="epochs without a better validation AUC before stopping"
    )
    parser.add_argument("--batch-size", type=integer(1), default=t.batch_size, help="images per training step")
    parser.add_argument(
        "--lr",
        type=number(0, open_low=True),
        default=t.lr,
        help="head's rate (default: 3e-5 with --init, 1e-3 without)",
    )
    parser.add_argument(
        "--backbone-lr", type=number(0), default=t.backbone_lr, help="learning rate of the unfrozen blocks"
    )
    parser.add_argument(
        "--lr-decay",
        type=number(0, 1, open_low=True),
        default=t.lr_decay,
        help="layer-wise decay: each unfrozen block below the top trains at this times the rate above it",
    )
    parser.add_argument(
        "--weight-decay",
        type=number(0),
        default=t.weight_decay,
        help="AdamW's decoupled weight decay (not on norms and biases)",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=number(0),
        default=t.warmup_epochs,
        help="epochs of linear warm-up before the cosine decay",
    )
    parser.add_argument(
        "--ema",
        type=number(0, 1, open_high=True),
        default=t.ema,
        help="decay per step of the weights' moving average (0: off)",
    )
    parser.add_argument("--mixup", type=number(0), default=t.mixup, help="mixup alpha (0: off)")
    parser.add_argument(
        "--label-smoothing",
        type=number(0, 1, open_high=True),
        default=t.label_smoothing,
        help="share of each target spread over the other classes",
    )
    parser.add_argument(
        "--bn", default=t.bn, choices=["train", "frozen"], help="batch-norm statistics of unfrozen blocks"
    )
    parser.add_argument(
        "--test-fraction", type=FRACTION, default=t.test_fraction, help="split recipe without a store, in (0, 1)"
    )
    parser.add_argument("--folds", type=integer(2), default=t.folds, help="split recipe without a store")
    parser.add_argument(
        "--allow-small-test",
        action="store_true",
        help=f"go on even if the test part holds fewer than {MIN_TEST_LESIONS} lesions of a class",
    )
    parser.add_argument("--seed", type=int, default=t.seed, help="seeds the split (without a store) and the training")
    parser.add_argument("--workers", type=WORKERS, default="auto", help="decoding processes, or auto (per machine)")
    parser.add_argument("--device", default=t.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision",
        default=t.precision,
        choices=["auto", *PRECISIONS],
        help="autocast precision of training and of the final embedding",
    )
    parser.add_argument(
        "--positive", default=t.positive, help="class for sensitivity at fixed specificity (default: mel/melanoma)"
    )
    parser.add_argument("--tta", default=t.tta, choices=list(VIEWS), help="test-time views of the final embeddings")
    parser.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="keep the chosen epoch's model instead of training again on all study rows",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run folder's last checkpoint")


def _unfreeze(text: str) -> str:
    if text == "all" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: a number of blocks (1 or more) or 'all'")


COMMANDS.update(
    {
        "backbones": Command(
            "list backbones, dims, input sizes, weight status",
            cmd_backbones,
            _backbones_arguments,
            "python cli.py backbones --search dinov2",
        ),
        "extract": Command(
            "embed a data set with frozen backbones into a feature store",
            cmd_extract,
            _extract_arguments,
            "python cli.py extract --data samples/isic_cc0/labels.csv --backbone efficientnet_lite0 "
            "--out demo/isic_cc0.h5",
        ),
        "fit": Command(
            "tune a head on a feature store with Optuna, test it once, write a run folder with a report",
            cmd_fit,
            _fit_arguments,
            "python cli.py fit --features demo/isic_cc0.h5 --head linear --trials 10 --out demo/run-linear",
        ),
        "evaluate": Command(
            "score a run on its test rows, or on another labelled store",
            cmd_evaluate,
            _evaluate_arguments,
            "python cli.py evaluate --run demo/run-linear --features other.h5 --label-map melanoma=mel,nevus=nv",
        ),
        "predict": Command(
            "classify new images with a run",
            cmd_predict,
            _predict_arguments,
            "python cli.py predict --run demo/run-linear --images new_images/ --out predictions.csv",
        ),
        "compare": Command(
            "runs side by side on the same test rows, with paired lesion-grouped differences",
            cmd_compare,
            _compare_arguments,
            "python cli.py compare demo/run-linear demo/run-xgboost --out comparison.md --json comparison.json",
        ),
        "audit": Command(
            "exact and near-duplicate images in a store, their clusters, split leaks and label conflicts",
            cmd_audit,
            _audit_arguments,
            "python cli.py audit --features demo/isic_cc0.h5 --threshold 0.95 --out demo/isic_cc0-audit",
        ),
        "map": Command(
            "a 2-D map (t-SNE) of a store's embeddings, coloured by label, split side or a metadata column",
            cmd_map,
            _map_arguments,
            "python cli.py map --features demo/isic_cc0.h5 --color label --out demo/isic_cc0-map.png",
        ),
        "finetune": Command(
            "train the top blocks of a backbone with the head, from a fit run's head",
            cmd_finetune,
            _finetune_arguments,
            "python cli.py finetune --data samples/isic_cc0/labels.csv --backbone efficientnet_lite0 "
            "--init demo/run-linear --out demo/run-finetuned",
        ),
    }
)


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


DEBUG = "SKINLESION_DEBUG"
"""Set this environment variable to see the traceback behind an error message."""


def environment_message(exc: OSError) -> str:
    """One line for a fault of the machine rather than of the input: a full disk, a folder that cannot
    be written, a file that cannot be read."""
    where = f"{exc.filename}: " if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (
            f"{where}the disk is full. Free some space and rerun the same command: finished work is kept "
            "(extraction journals, study trials)"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{where}{exc.strerror or exc}: choose a folder you can write to (--out), or change its permissions"
    return f"{where}{exc.strerror or exc}"


def main(argv: list[str] | None = None, prog: str = "cli.py") -> int:
    """Exit status: 0 done; 1 a fault of the machine (full disk, unwritable folder) or, where asked
    (--strict, --max-failed), images that could not be used; 2 bad input or options; 130 interrupted.
    Every error is one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None, prog).parse_args(argv)
    handler = _StderrHandler()
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if os.environ.get(DEBUG):
            raise
        if _user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            print(f"error: {environment_message(exc)}", file=sys.stderr)
            global _ABANDON
            _ABANDON = True
            return 1
        raise


_ABANDON = False
"""Set after a fault of the machine: the process then ends without running destructors, because a library
that failed mid-write (HDF5 on a full disk) can crash while freeing its objects, after the message."""


def entry(prog: str = "skinlesion") -> NoReturn:
    """The console script `skinlesion` (pyproject.toml), and `python cli.py`: run the command, then exit
    with its status."""
    status = main(prog=prog)
    if _ABANDON:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    entry(prog="cli.py")
