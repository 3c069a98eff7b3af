"""`cli.py fit`: tune a head on a feature store with Optuna, refit the best, score it once on the test
rows, and write a run folder with its report.

The protocol (../shared/DESIGN.md): a lesion-grouped, stratified split is made once and stored in the
feature store; the study only sees the study rows, scored by grouped K-fold cross-validation; the best
parameters are refitted on all study rows and scored once on the test rows. For stores larger than the
memory budget (streamed from disk) the `holdout` protocol scores fold 0 only and keeps the best trial's
own model, fitted on the other folds (docs/evaluation.md says why). The run also keeps a description
of its study rows' embeddings that flags images unlike them (classify/ood.py), except for streamed
stores, whose embeddings are never all in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import optuna
from filelock import FileLock

from classify.calibration import CALIBRATIONS, Calibration, brier_score, fit_calibration, top_label_ece
from classify.heads import HEADS, Head, get_head
from classify.inputs import InputSpec, MetaEncoder, fit_views, proba_views, store_meta
from classify.ood import OOD_PERCENTILE, Ood, fit_ood, out_of_fold_threshold
from classify.metrics import MALIGNANT, default_positive, evaluate
from classify.operating import DEFAULT_RULE, OperatingPoint, choose_threshold, parse_rule
from classify.report import study_parts
from classify.subgroups import subgroup_figures
from classify.runs import RunRecord, extraction_record, jsonable, write_run
from classify.study import (
    JOURNAL,
    Objective,
    fail_dead_local,
    fail_interrupted,
    fail_stale,
    history,
    kept_trial,
    open_study,
    progress,
    storage_for,
)
from features.splits import (
    TEST,
    UNUSED,
    SplitSpec,
    left_out,
    lesions_in_test,
    small_test,
    split_counts,
    split_for,
    study_subset,
)
from features.rows import MEMORY_BUDGET, StoreRows, embedded_rows, load_inputs, parse_budget, read_embeddings
from features.store import FeatureStore, StoreError, stored_name

__all__ = [
    "Data",
    "FitConfig",
    "FitError",
    "PROTOCOLS",
    "Settled",
    "fit",
    "load_data",
    "parse_fractions",
    "study_name",
]

log = logging.getLogger("classify")


class FitError(ValueError):
    """Options that cannot work with this store; raised before any training."""


PROTOCOLS = ("auto", "cv", "holdout")


@dataclass
class FitConfig:
    """Every option of `cli.py fit` and its default: the one place these defaults live."""

    features: str = ""
    head: str = ""
    out: str = ""
    backbone: str = ""
    """Comma-separated; empty: the store's only backbone."""
    trials: int = 20
    """Trials this process adds to the study (0: none, only the refit and report of the study's best)."""
    report: bool = True
    """Refit the best trial and write the report after this process's trials; `False` for the workers
    of a shared study, whose report is made once by `fit --trials 0` when the study is done."""
    heartbeat: int = 60
    """Seconds between a worker's heartbeats in a database storage; a trial silent for twice this long
    belongs to a dead worker and is failed and queued again."""
    timeout: float | None = None
    n_jobs: int = 1
    storage: str | None = None
    study: str | None = None
    folds: int = 5
    test_fraction: float = 0.2
    allow_small_test: bool = False
    """Fit even when the test part holds fewer than MIN_TEST_LESIONS lesions of a class; every figure of
    the run then carries a warning."""
    seed: int = 0
    views: str = "mean"
    meta: str = ""
    """Comma-separated metadata columns to use beside the embeddings."""
    positive: str | None = None
    device: str = "auto"
    memory_budget: str = MEMORY_BUDGET
    """Embeddings that need more (with working copies) are streamed from the store in blocks:
    `1GB`, `800MB`, or `50%` of this machine's memory."""
    protocol: str = "auto"
    """How trials are scored: `cv` (grouped K-fold), `holdout` (fold 0 only; the final model is the best
    trial's, fitted on the other folds); `auto`: holdout when the embeddings are streamed, else cv."""
    operating_point: str = "auto"
    """The rule that sets the positive class's decision threshold on the out-of-fold predictions
    (classify/operating.py): `sens=S`, `spec=S`, `youden`, `none`; `auto`: sens=0.95 where there is a
    positive class."""
    calibrate: str = "temperature"
    """How the out-of-fold predictions calibrate the run's probabilities: none, temperature, isotonic
    (classify/calibration.py)."""
    malignant: str = ",".join(MALIGNANT)
    """Classes counted malignant in the malignant-vs-benign figures of a multi-class run."""
    group_duplicates: float = 0.0
    """Cosine threshold: near-duplicate images (and copies of one file) have their lesion groups merged
    before the split is made, so no cluster straddles it (features/duplicates.py; 0: off)."""
    subgroups: str = ""
    """Comma-separated metadata columns whose groups get their own test figures (classify/subgroups.py)."""
    fractions: str = ""
    """Label efficiency: comma-separated shares of the study lesions (e.g. `0.1,0.25,0.5,1`), each below 1
    fitted by the same recipe as a run of its own under RUN/fractions/<share>/ and scored on the same test
    rows; the run itself is the share 1, and its report holds the table and plot of all of them."""
    fraction: float = 1.0
    """The share of the study lesions this run learns from (`study_subset`: nested, lesion-grouped, per
    class and fold); set by --fractions for its runs."""


@dataclass
class Data:
    """The matrices of one fit: every usable row, and which are study and test rows."""

    x: np.ndarray | StoreRows
    y: np.ndarray
    groups: np.ndarray
    ids: np.ndarray
    sha256: np.ndarray
    folds: np.ndarray
    encoder: MetaEncoder

    @property
    def study(self) -> np.ndarray:
        return self.folds >= 0

    @property
    def test(self) -> np.ndarray:
        return self.folds == TEST


def _backbones(store: FeatureStore, value: str) -> tuple[str, ...]:
    names = tuple(stored_name(b.strip()) for b in value.split(",") if b.strip())  # as the store spells them
    if not names:
        if len(store.backbones) != 1:
            raise FitError(
                f"{store.path} holds {', '.join(store.backbones) or 'no embeddings'}: name one with --backbone"
            )
        names = tuple(store.backbones)
    for name in names:
        store.backbone_attrs(name)  # raises, listing the store's backbones
    return names


def load_data(store: FeatureStore, spec: InputSpec, split: np.ndarray, budget: int) -> Data:
    """The rows a fit uses (labelled, in the split, embedded by every backbone): labels in memory, the
    embeddings too unless they exceed `budget` bytes (then streamed: `StoreRows`)."""
    keep = embedded_rows(store, spec.backbones) & (split != UNUSED)
    meta = store_meta(store, spec.meta)
    encoder = MetaEncoder.fit({c: v[keep & (split >= 0)] for c, v in meta.items()})
    x = load_inputs(store, spec.backbones, keep, encoder.transform(meta, len(split)), budget, all_views=spec.all_views)
    columns = [store.column(name)[keep] for name in ("label", "group", "image_id", "sha256")]
    return Data(x, *columns, split[keep], encoder)


def study_name(store: FeatureStore, spec: InputSpec, split: SplitSpec, head: str) -> str:
    """One study per store x inputs x split x head, recognisable and unique."""
    identity = {
        "fingerprints": {b: store.backbone_attrs(b)["fingerprint"] for b in spec.backbones},
        "rows": [str(store.column("image_id")[0]), str(len(store))],
        "inputs": spec.as_dict(),
        "split": split.name,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{head}.{'+'.join(spec.backbones)}.{digest}"


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _test_meta(store: FeatureStore, data: Data, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The metadata columns' values of the test rows, row for row."""
    rows = store.rows_of(data.ids[data.test])
    return {c: values[rows] for c, values in store_meta(store, columns).items()}


def _operating_rule(cfg: FitConfig, positive: str | None) -> str:
    """--operating-point resolved (`auto`: the screening rule where there is a positive class) and
    --calibrate checked, before any trial runs."""
    if cfg.calibrate not in CALIBRATIONS:
        raise FitError(f"--calibrate {cfg.calibrate!r}: choose {', '.join(CALIBRATIONS)}")
    if cfg.operating_point == "auto":
        return DEFAULT_RULE if positive is not None else "none"
    try:
        rule = parse_rule(cfg.operating_point)
    except ValueError as exc:
        raise FitError(str(exc)) from None
    if rule != "none" and positive is None:
        raise FitError(
            f"--operating-point {cfg.operating_point}: the store's classes have no positive class (mel or "
            "melanoma); name one with --positive"
        )
    return rule


def _fixed_params(head_cls, cfg: FitConfig) -> dict:
    """Head parameters set by the command, not searched: the device, and with --n-jobs N parallel
    trials, 1/N of the cores each (threads that outnumber the cores slow every trial down)."""
    params = head_cls().get_params()
    fixed = {"device": cfg.device} if "device" in params else {}
    if cfg.n_jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // cfg.n_jobs)
        if head_cls.name == "mlp":
            import torch  # only here: linear and XGBoost fits run without torch (heads.py says why)

            torch.set_num_threads(threads)
        if "n_jobs" in params:
            fixed["n_jobs"] = threads
    return fixed


def _check_parts(store: FeatureStore, data: Data, folds: int, dropped: dict[str, int]) -> None:
    """The split's promises for the rows actually fitted: every class in every fold and in the test part
    (rows left out after the split was made, e.g. not embedded by this backbone, could break them)."""
    for c in sorted(set(data.y)):
        parts = {f"fold {k}": data.folds == k for k in range(folds)} | {"the test part": data.test}
        empty = [part for part, rows in parts.items() if not np.any(rows & (data.y == c))]
        if empty:
            why = f" after leaving out {', '.join(f'{n} {r}' for r, n in dropped.items())}" if dropped else ""
            raise FitError(
                f"{store.path}: class {c!r} has no rows in {', '.join(empty)}{why}; embed the missing "
                "images, or use fewer --folds"
            )


def _finished(study: optuna.Study, since: int = 0) -> int:
    """Finished trials of the study (numbered `since` or later)."""
    return sum(t.state.is_finished() and t.number >= since for t in study.get_trials(deepcopy=False))


def parse_fractions(text: str) -> tuple[float, ...]:
    """--fractions as sorted distinct shares in (0, 1], always with 1 (the run itself); () when empty."""
    try:
        shares = {float(v) for v in text.split(",") if v.strip()}
    except ValueError:
        shares = {-1.0}
    if any(not 0 < f <= 1 for f in shares):
        raise FitError(f"--fractions {text}: comma-separated shares of the study lesions in (0, 1], e.g. 0.1,0.25,1")
    return tuple(sorted(shares | {1.0})) if shares else ()


def _fraction_runs(cfg: FitConfig, fractions: tuple[float, ...]) -> list[dict]:
    """Fit each share below 1 as its own run (RUN/fractions/<share>/, study `<name>-frac<share>`), by the
    same recipe; their metrics (empty for a worker that only adds trials)."""
    done = []
    for share in fractions:
        if share < 1:
            log.info("label efficiency: fitting %g of the study lesions", share)
            done.append(
                fit(
                    dataclasses.replace(
                        cfg,
                        out=str(Path(cfg.out) / "fractions" / f"{share:g}"),
                        fractions="",
                        fraction=share,
                        study=f"{cfg.study}-frac{share:g}" if cfg.study else None,
                    )
                )
            )
    return [m for m in done if m]


def _efficiency_row(metrics: dict, folder: str) -> dict:
    """One row of the label-efficiency table: the share, the study rows it learned from, the test figures."""
    test = metrics["test"]
    return {
        **metrics["fraction"],
        "run": folder,
        **{k: test[k] for k in ("auc", "balanced_accuracy", "n")},
        "ci95": {k: test["ci95"].get(k) for k in ("auc", "balanced_accuracy")},
    }


def _redact(url: str | None) -> str | None:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url) if url else url


def fit(cfg: FitConfig) -> dict:
    """Run the whole fit as configured; return the metrics written to RUN/metrics.json."""
    started = time.monotonic()
    if not cfg.out:
        raise FitError("--out RUN: name the run folder")
    head_cls = get_head(cfg.head)
    store = FeatureStore(cfg.features)
    spec = InputSpec(_backbones(store, cfg.backbone), cfg.views, _columns(cfg.meta))
    if cfg.protocol not in PROTOCOLS:
        raise FitError(f"--protocol {cfg.protocol!r}: choose {', '.join(PROTOCOLS)}")
    if not 0 < cfg.test_fraction < 1:
        raise FitError(f"--test-fraction {cfg.test_fraction}: a share of the lesions strictly between 0 and 1")
    if cfg.folds < 2:
        raise FitError(f"--folds {cfg.folds}: cross-validation needs at least 2 folds")
    budget = parse_budget(cfg.memory_budget)
    if not 0 <= cfg.group_duplicates <= 1:
        raise FitError(f"--group-duplicates {cfg.group_duplicates}: a cosine similarity from 0 (off) to 1")
    dup_backbone = spec.backbones[0] if cfg.group_duplicates else ""
    split_spec = SplitSpec(cfg.test_fraction, cfg.folds, cfg.seed, cfg.group_duplicates, dup_backbone)
    split = split_for(store, split_spec)
    fractions = parse_fractions(cfg.fractions)
    if not 0 < cfg.fraction <= 1:
        raise FitError(f"fraction {cfg.fraction}: a share of the study lesions in (0, 1]")
    outside = 0
    if cfg.fraction < 1:  # the same test rows; the study rows of the share only
        kept = study_subset(split, store.column("label"), store.column("group"), cfg.fraction, cfg.seed)
        outside = int(np.sum((split >= 0) & ~kept))
        split = np.where((split >= 0) & ~kept, UNUSED, split).astype(np.int8)
    data = load_data(store, spec, split, budget)
    dropped = left_out(store)
    not_embedded = int(np.sum((split != UNUSED) & ~embedded_rows(store, spec.backbones)))
    if not_embedded:
        dropped[f"not embedded by {', '.join(spec.backbones)}"] = not_embedded
    _check_parts(store, data, cfg.folds, dropped)
    warning = small_test(lesions_in_test(data.y, data.groups, data.folds))
    if warning and not cfg.allow_small_test:
        raise FitError(
            f"{store.path}: {warning}. Raise --test-fraction (now {cfg.test_fraction:g}) or use more "
            "data, or pass --allow-small-test to fit anyway with every figure marked"
        )
    streamed = isinstance(data.x, StoreRows)
    if streamed and not head_cls.streams:
        raise FitError(
            f"{store.path}: the {head_cls.name} head needs all {len(data.x)} rows in memory, and with working "
            f"copies they exceed the memory budget ({cfg.memory_budget}); use a head that learns from blocks "
            f"({', '.join(n for n, h in HEADS.items() if h.streams)}), or raise --memory-budget"
        )
    protocol = ("holdout" if streamed else "cv") if cfg.protocol == "auto" else cfg.protocol
    if set(data.groups[data.test]) & set(data.groups[data.study]):
        raise StoreError(f"{store.path}: split {split_spec.name} puts a lesion on both sides")  # never expected
    classes = sorted(set(data.y))
    positive = cfg.positive or default_positive(classes)
    if positive is not None and positive not in classes:
        raise FitError(f"--positive {positive!r}: not a class of this store ({', '.join(classes)})")
    rule = _operating_rule(cfg, positive)
    store_meta(store, _columns(cfg.subgroups))  # a column the store lacks: refused before any trial
    run = Path(cfg.out)
    name = cfg.study or study_name(store, spec, split_spec, head_cls.name)
    if cfg.fraction < 1 and not cfg.study:
        name += f"-frac{cfg.fraction:g}"
    if cfg.trials == 0 and cfg.storage is None and not (run / JOURNAL).is_file():
        raise FitError(f"--trials 0: {run} holds no study to report on; add trials first (--trials N)")
    if dropped:
        log.warning(
            "%s: %d labelled rows are left out of the split (%s)",
            store.path,
            sum(dropped.values()),
            ", ".join(f"{n} {reason}" for reason, n in dropped.items()),
        )
    if warning:
        log.warning("%s (--allow-small-test: every figure of this run is marked)", warning)
    if outside:
        dropped[f"study rows outside the {cfg.fraction:g} share of the study lesions"] = outside
    efficiency = _fraction_runs(cfg, fractions)
    log.info(
        "%s: %d study rows in %d folds, %d test rows (%s); head %s; study %s; %s; trials scored by %s",
        store.path,
        data.study.sum(),
        cfg.folds,
        data.test.sum(),
        split_spec.name,
        head_cls.name,
        name,
        f"embeddings streamed in blocks of {data.x.block_rows} rows (budget {budget / 2**20:.0f} MiB)"
        if streamed
        else "embeddings in memory",
        "fold 0 (holdout)" if protocol == "holdout" else f"{cfg.folds}-fold cross-validation",
    )
    # one line per trial comes from `progress`; a failed trial's own error is raised by `optimize`
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(name, storage_for(cfg.storage, run, cfg.heartbeat), cfg.seed)
    if cfg.storage is None:  # a journal file has no heartbeat; databases fail and retry a dead worker's trial
        fail_dead_local(study)
    fixed = _fixed_params(head_cls, cfg)
    objective = Objective(
        head_cls,
        data.x[data.study],
        data.y[data.study],
        data.groups[data.study],
        data.folds[data.study],
        seed=cfg.seed,
        fixed=fixed,
        protocol=protocol,
        keep=run / "trials",
    )
    if cfg.trials > 0:
        before = len(study.get_trials(deepcopy=False))
        try:
            study.optimize(
                objective, n_trials=cfg.trials, timeout=cfg.timeout, n_jobs=cfg.n_jobs, callbacks=[progress()]
            )
        except KeyboardInterrupt:
            fail_interrupted(study, first=before)
            raise KeyboardInterrupt(
                f"after {_finished(study, since=before)} trials of this run; study {name} keeps every finished trial "
                f"({_finished(study)} now). Rerun the same command to add --trials more, or with --trials 0 to "
                "refit the best and write the report"
            ) from None
    fail_stale(study)
    if not cfg.report:
        log.info(
            "study %s: %d trials; when every worker is done, `fit --trials 0` with the same --storage, "
            "--study and inputs refits the best and writes the report",
            name,
            len(study.trials),
        )
        return {}
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise FitError(f"study {name}: no trial completed (all pruned or failed); run more --trials")
    best = study.best_trial
    params = {**head_cls.search_space(optuna.trial.FixedTrial(best.params)), **fixed}
    run.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run / ".final.lock")):  # several workers may finish at once: one writes at a time
        resolved = {
            "protocol": protocol,
            "memory_budget_bytes": budget,
            "streamed": streamed,
            "left_out": dropped,
            "warning": warning,
        }
        settled = Settled(
            spec=spec,
            split_spec=split_spec,
            head_cls=head_cls,
            params=params,
            classes=classes,
            positive=positive,
            rule=rule,
            study=study,
            name=name,
            resolved=resolved,
        )
        metrics = _final(cfg, store, data, settled, efficiency)
    log.info("fit took %.0f s", time.monotonic() - started)
    return metrics


@dataclass(kw_only=True)
class Settled:
    """What a fit has settled when the study is done: its inputs and split, and the study's best."""

    spec: InputSpec
    split_spec: SplitSpec
    head_cls: type[Head]
    params: dict
    """The best trial's parameters, with the fixed ones."""
    classes: list[str]
    positive: str | None
    rule: str
    """The operating point's rule (`none`: the run decides by the argmax)."""
    study: optuna.Study
    name: str
    """The study's name."""
    resolved: dict
    """What the options resolved to: protocol, memory budget, streaming, rows left out, the warning."""


def _final(cfg: FitConfig, store: FeatureStore, data: Data, settled: Settled, efficiency: list[dict]) -> dict:
    """The final model and its figures, and every file of the run folder (through `write_run`);
    `efficiency`: the metrics of the label-efficiency runs of smaller shares (--fractions)."""
    run, classes = Path(cfg.out), settled.classes
    majority = max(classes, key=lambda c: (np.sum(data.y[data.study] == c), c))
    head, scored, raw_cv = _final_model(cfg, data, settled)
    raw_test = _aligned(proba_views(head, data.x[data.test]), head.classes_, classes)
    y, g = data.y[data.study], data.groups[data.study]
    study, resolved = settled.study, settled.resolved
    # calibrated and thresholded on the out-of-fold predictions only; the test rows are scored once
    codes = np.array([classes.index(c) for c in y[scored]])
    calibration = fit_calibration(cfg.calibrate, codes, raw_cv)
    cv_proba, test_proba = calibration.apply(raw_cv), calibration.apply(raw_test)
    operating = None
    if settled.rule != "none":
        k = classes.index(settled.positive)
        threshold = choose_threshold(settled.rule, y[scored] == settled.positive, cv_proba[:, k])
        operating = OperatingPoint(settled.rule, settled.positive, threshold)
    figures = {
        "seed": cfg.seed,
        "threshold": operating.threshold if operating else None,
        "rule": settled.rule if operating else None,
        "malignant": tuple(c.strip() for c in cfg.malignant.split(",") if c.strip()),
    }
    test_y, test_g = data.y[data.test], data.groups[data.test]
    metrics = {
        "test": {
            **evaluate(test_y, test_proba, classes, test_g, settled.positive, majority, **figures),
            "calibration": calibration_figures(calibration, test_y, raw_test, test_proba, classes),
        },
        "cv": {
            **evaluate(y[scored], cv_proba, classes, g[scored], settled.positive, majority, **figures),
            "calibration": calibration_figures(calibration, y[scored], raw_cv, cv_proba, classes),
            "study_best_value": study.best_value,
            "folds": cfg.folds,
            "protocol": resolved["protocol"],
        },
    }
    if cfg.subgroups:
        metrics["test"]["subgroups"] = subgroup_figures(
            _test_meta(store, data, _columns(cfg.subgroups)),
            test_y,
            test_proba,
            classes,
            test_g,
            positive=settled.positive,
            threshold=figures["threshold"],
            seed=cfg.seed,
        )
    embeddings = None if isinstance(data.x, StoreRows) else _embeddings(store, data, settled.spec)
    ood = _ood(data, embeddings)
    if ood is not None:
        test_scores = ood.score(embeddings[data.test])
        flagged = int(np.sum(~ood.in_distribution(test_scores)))
        metrics["test"]["ood"] = {
            "threshold": ood.threshold,
            "percentile": OOD_PERCENTILE,
            "flagged": flagged,
            "rows": len(test_scores),
            "share": flagged / max(len(test_scores), 1),
        }
    if cfg.fraction < 1 or efficiency:
        study_groups = data.groups[data.study]
        metrics["fraction"] = {
            "share": cfg.fraction,
            "study_images": len(study_groups),
            "study_lesions": len(set(study_groups)),
        }
    if efficiency:
        metrics["label_efficiency"] = [
            *(_efficiency_row(m, f"fractions/{m['fraction']['share']:g}") for m in efficiency),
            _efficiency_row(metrics, "."),
        ]
    if resolved["warning"]:
        metrics["warning"] = metrics["test"]["warning"] = metrics["cv"]["warning"] = resolved["warning"]
    metrics["left_out"] = resolved["left_out"]
    config = {
        **dataclasses.asdict(cfg),
        "storage": _redact(cfg.storage) or str(run / "study.journal"),
        "backbone": ",".join(settled.spec.backbones),
        "study": settled.name,
        "positive": settled.positive,
        "split": settled.split_spec.name,
        "params": settled.params,
        **resolved,
        "torch_version": metadata.version("torch"),
        "optuna_version": optuna.__version__,
    }
    trials = history(study)
    best = study.best_trial
    write_run(
        run,
        RunRecord(
            head=head,
            store=store.path,
            split=settled.split_spec.name,
            ids=data.ids,
            folds=data.folds,
            sha256=data.sha256,
            inputs=settled.spec,
            meta_encoder=data.encoder.columns,
            extraction=extraction_record(store, settled.spec.backbones),
            positive=settled.positive,
            majority=majority,
            config=config,
            metrics=metrics,
            predictions={
                "test": (data.ids[data.test], test_proba),
                "cv": (data.ids[data.study][scored], cv_proba),
            },
            test_labels=data.y[data.test],
            counts=split_counts(data.folds, data.y),
            report=study_parts(metrics, config, trials),
            calibration=calibration,
            operating_point=operating,
            test_uncalibrated=raw_test,
            ood=ood,
            card_extra={"study": settled.name},
            extra_files={
                "study.json": {
                    "name": settled.name,
                    "best": {"number": best.number, "value": best.value, "params": best.params, **best.user_attrs},
                    "trials": trials,
                }
            },
        ),
    )
    return jsonable(metrics)


def _embeddings(store: FeatureStore, data: Data, spec: InputSpec) -> np.ndarray:
    """The backbone embeddings (the views' mean, no metadata) of `data`'s rows, row for row."""
    return read_embeddings(store, spec.backbones, all_views=False)[store.rows_of(data.ids)]


def _ood(data: Data, embeddings: np.ndarray | None) -> Ood | None:
    """The out-of-distribution description of the study rows (`embeddings`: `data`'s, row for row), its
    threshold set out of fold over the study folds (classify/ood.py); None, with a log line, for
    streamed embeddings (`embeddings` None), which this would load whole."""
    if embeddings is None:
        log.info("embeddings streamed from disk: the run gets no out-of-distribution description")
        return None
    x, y, folds = embeddings[data.study], data.y[data.study], data.folds[data.study]
    return fit_ood(x, y, threshold=out_of_fold_threshold(x, y, folds))


def _final_model(cfg: FitConfig, data: Data, settled: Settled) -> tuple[Head, np.ndarray, np.ndarray]:
    """The final head, which study rows it was scored on and their predictions (columns: the classes).
    With cv: the out-of-fold predictions of the best parameters and the refit on all study rows. With
    the holdout protocol: the best trial's own model (fitted on folds 1..K-1; fitted again only where
    it is not on this machine) and its predictions of fold 0."""
    head_cls, params, classes = settled.head_cls, settled.params, settled.classes
    x, y, g, folds = data.x[data.study], data.y[data.study], data.groups[data.study], data.folds[data.study]
    if settled.resolved["protocol"] == "holdout":
        scored = folds == 0
        kept = kept_trial(settled.study.best_trial, head_cls, params, cfg.seed)  # the same fit, already made
        if kept is None:
            head = head_cls(**params, random_state=cfg.seed)
            fit_views(head, x[~scored], y[~scored], g[~scored])
            kept = head, proba_views(head, x[scored])
        return kept[0], scored, _aligned(kept[1], kept[0].classes_, classes)
    cv_proba = np.zeros((len(y), len(classes)))
    for k in range(cfg.folds):
        head = head_cls(**params, random_state=cfg.seed)
        fit_views(head, x[folds != k], y[folds != k], g[folds != k])
        cv_proba[folds == k] = _aligned(proba_views(head, x[folds == k]), head.classes_, classes)
    head = head_cls(**params, random_state=cfg.seed)
    fit_views(head, x, y, g)
    return head, np.ones(len(y), dtype=bool), cv_proba


def calibration_figures(
    calibration: Calibration, y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, classes: list[str]
) -> dict:
    """What the calibration did to these rows: ECE and Brier score before and after."""
    codes = np.array([classes.index(c) for c in y])
    return {
        "method": calibration.method,
        **({"temperature": calibration.temperature} if calibration.method == "temperature" else {}),
        "ece_before": top_label_ece(codes, raw),
        "ece_after": top_label_ece(codes, calibrated),
        "brier_before": brier_score(codes, raw),
        "brier_after": brier_score(codes, calibrated),
    }


def _aligned(proba: np.ndarray, have: np.ndarray, classes: list[str]) -> np.ndarray:
    """Columns in `classes` order (a fold's head may know fewer classes than the whole study)."""
    out = np.zeros((len(proba), len(classes)))
    for j, c in enumerate(have):
        out[:, classes.index(c)] = proba[:, j]
    return out
