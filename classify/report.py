"""The human-readable side of a run: report.md and its PNG plots (confusion matrix, ROC curves,
reliability diagram, and each kind of run's own: the optimisation history of a study, the training
curves of fine-tuning).

The report is assembled from section builders shared by every run; what differs between kinds of run
comes in as `ReportParts`, built by the command that made the run (`study_parts`, `training_parts`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve  # noqa: E402

from classify.metrics import reliability_bins  # noqa: E402
from classify.runs import write_text  # noqa: E402
from features.store import license_caveat  # noqa: E402

__all__ = [
    "PLOTS",
    "SHARED_PLOTS",
    "calibration_section",
    "clinical_section",
    "subgroups_section",
    "Plot",
    "ReportParts",
    "confusion_section",
    "data_section",
    "decision_sentence",
    "files_section",
    "headline",
    "headline_section",
    "label_efficiency_section",
    "markdown",
    "ood_section",
    "per_class_section",
    "plots_section",
    "study_parts",
    "study_section",
    "title_section",
    "training_parts",
    "training_section",
    "write_evaluation_report",
    "write_run_report",
]

PLOTS = "plots"
CONFUSION, ROC, RELIABILITY = "confusion_matrix.png", "roc_curves.png", "reliability.png"
EFFICIENCY = "label_efficiency.png"
SHARED_PLOTS = (
    (CONFUSION, "confusion matrix"),
    (ROC, "ROC and precision-recall curves"),
    (RELIABILITY, "reliability"),
)
"""Every run's plots (file under plots/, alt text), in the report's order."""


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _ci(metrics: dict, key: str) -> str:
    interval = metrics.get("ci95", {}).get(key) or []
    return (
        f"{_fmt(metrics[key])} ({_fmt(interval[0])}-{_fmt(interval[1])})" if len(interval) == 2 else _fmt(metrics[key])
    )


def headline(metrics: dict) -> str:
    """One line per part: balanced accuracy and AUC with their intervals, and the baseline."""
    lines = [f"WARNING: {metrics['warning']}"] if metrics.get("warning") else []
    for part in [p for p in ("test", "cv", "validation") if p in metrics]:
        m = metrics[part]
        lines.append(
            f"{part:>10}: balanced accuracy {_ci(m, 'balanced_accuracy')}, AUC {_ci(m, 'auc')}  "
            f"(majority-class baseline: {_fmt(m['baseline']['balanced_accuracy'])}, AUC 0.5; n={m['n']})"
        )
    return "\n".join(lines)


@dataclass
class Plot:
    """A plot of one kind of run: its file under plots/, its alt text in report.md, and how to draw it."""

    name: str
    alt: str
    draw: Callable[[Path], None]


@dataclass
class ReportParts:
    """What a kind of run adds to the shared report; the command that made the run builds it
    (`study_parts` for `fit`, `training_parts` for `finetune`), so the report never asks a run its kind."""

    title: str
    """After "Run report: "."""
    second: str
    """The metrics part shown below the test row of the headline table ("cv", "validation")."""
    second_label: str
    """That row's label."""
    notes: list[str] = field(default_factory=list)
    """Sentences right after the headline table's intervals."""
    sections: list[list[str]] = field(default_factory=list)
    """Markdown sections (lines each) after the data section."""
    plots: list[Plot] = field(default_factory=list)
    """Drawn after the shared plots, and shown after them."""
    files: list[str] = field(default_factory=list)
    """The files of this kind of run, named in the report's list of files."""


def study_parts(metrics: dict, config: dict, trials: list[dict]) -> ReportParts:
    """A `fit` run's parts: the cross-validation (or holdout fold) row, the study's best value, the study
    section and the optimisation history."""
    second = metrics["cv"]
    if second.get("protocol") == "holdout":
        label = "validation fold 0 (holdout: the final model is the one fitted on folds 1..K-1)"
    else:
        label = "cross-validation (out of fold)"
    scored = "fold 0 of" if second.get("protocol") == "holdout" else "mean over"
    best = f"The study's best balanced accuracy ({scored} {second['folds']} folds): {_fmt(second['study_best_value'])}."
    plots = [Plot("optimisation_history.png", "history", functools.partial(_history, trials=trials))]
    efficiency = metrics.get("label_efficiency") or []
    if efficiency:
        plots.append(Plot(EFFICIENCY, "label efficiency", functools.partial(_efficiency, rows=efficiency)))
    return ReportParts(
        title=f"{config['head']} on {config['backbone']}",
        second="cv",
        second_label=label,
        notes=[best],
        sections=[study_section(config, trials), label_efficiency_section(efficiency)],
        plots=plots,
        files=["`study.json`", *(["`fractions/<share>/` (the label-efficiency runs)"] if efficiency else [])],
    )


def training_parts(config: dict, epochs: list[dict]) -> ReportParts:
    """A `finetune` run's parts: the validation row, the training section with its decision sentence,
    and the training curves."""
    if config.get("refit"):
        label = "validation (fold 0: the chosen epoch, before the refit on all study rows)"
    else:
        label = "validation (fold 0: picks the epoch)"
    return ReportParts(
        title=f"fine-tuned {config['backbone']}",
        second="validation",
        second_label=label,
        sections=[training_section(config, epochs)],
        plots=[Plot("training_history.png", "history", functools.partial(_epochs, epochs=epochs))],
        files=["`history.json`", "`backbone.pt` (the fine-tuned backbone)", "`embeddings.h5` (its embeddings)"],
    )


def write_run_report(
    run: Path,
    *,
    metrics: dict,
    config: dict,
    counts: dict,
    test_labels: np.ndarray,
    test_proba: np.ndarray,
    parts: ReportParts,
    extraction: dict[str, dict] | None = None,
    test_uncalibrated: np.ndarray | None = None,
) -> None:
    """report.md and plots/*.png in the run folder: the shared sections and plots, and `parts`;
    `extraction` (backbone -> its extraction record) names the weights' licences; `test_uncalibrated`,
    the head's own probabilities where the run calibrates them, draws the reliability before it too."""
    plots = run / PLOTS
    plots.mkdir(exist_ok=True)
    classes = metrics["test"]["classes"]
    _confusion(plots / CONFUSION, np.array(metrics["test"]["confusion_matrix"]), classes)
    _curves(plots / ROC, test_labels, test_proba, classes, metrics["test"], metrics["test"].get("positive"))
    _reliability(plots / RELIABILITY, test_labels, test_proba, classes, before=test_uncalibrated)
    for plot in parts.plots:
        plot.draw(plots / plot.name)
    write_text(run / "report.md", markdown(metrics, config, counts, parts, extraction or {}))


def markdown(metrics: dict, config: dict, counts: dict, parts: ReportParts, extraction: dict | None = None) -> str:
    """report.md: sections separated by a blank line."""
    test = metrics["test"]
    sections = [
        title_section(config, parts.title),
        license_section(extraction or {}),
        headline_section(metrics, metrics[parts.second], parts.second_label, parts.notes),
        clinical_section(test, metrics[parts.second], parts.second_label),
        calibration_section(test, metrics[parts.second], parts.second_label),
        ood_section(test),
        subgroups_section(test),
        per_class_section(test),
        confusion_section(test),
        data_section(metrics, counts),
        *parts.sections,
        plots_section([*SHARED_PLOTS, *((p.name, p.alt) for p in parts.plots)]),
        files_section(parts.files),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def write_evaluation_report(
    folder: Path,
    *,
    metrics: dict,
    run_test: dict,
    title: str,
    labels: np.ndarray,
    proba: np.ndarray,
) -> None:
    """report.md and plots/*.png of one `evaluate`: the scored rows' figures beside the run's own test
    figures (the same metrics, so that a drop on external data shows at a glance), its clinical,
    calibration and subgroup sections, and its plots."""
    plots = folder / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    classes = metrics["classes"]
    _confusion(plots / CONFUSION, np.array(metrics["confusion_matrix"]), classes)
    _curves(plots / ROC, labels, proba, classes, metrics, metrics.get("positive"))
    _reliability(plots / RELIABILITY, labels, proba, classes)
    here, own = "this evaluation", "the run's test rows"
    rows = [
        ("images (lesions)", lambda m: f"{m['n']} ({m['lesions']})"),
        ("balanced accuracy (95 % CI)", lambda m: _ci(m, "balanced_accuracy")),
        ("AUC (95 % CI)", lambda m: _ci(m, "auc")),
        ("accuracy", lambda m: _fmt(m["accuracy"])),
        ("ECE", lambda m: _fmt(m["ece"])),
        ("sensitivity at the operating point", lambda m: _value((m.get("operating_point") or {}).get("sensitivity"))),
        ("specificity at the operating point", lambda m: _value((m.get("operating_point") or {}).get("specificity"))),
        ("specificity at 95 % sensitivity", lambda m: _value(m.get("spec_at_95_sens"))),
        ("pAUC above 80 % TPR", lambda m: _value(m.get("pauc_80"))),
    ]
    warned = [f"> **Warning: {metrics['warning']}.**", ""] if metrics.get("warning") else []
    excluded = metrics.get("excluded") or {}
    lines = [
        f"# Evaluation: {title}",
        "",
        *warned,
        f"| | {here} | {own} |",
        "| --- | --- | --- |",
        *(f"| {name} | {show(metrics)} | {show(run_test)} |" for name, show in rows),
        "",
        "Intervals: 95 % bootstrap over lesions. The run's calibration and operating point apply unchanged.",
        "Left out, seen by the run: "
        + (", ".join(f"{n} {reason}" for reason, n in excluded.items()) if excluded else "none")
        + ".",
    ]
    near = metrics.get("near_duplicates")
    if near:
        scored = (
            f" Scored apart: AUC {_ci(near, 'auc')}, balanced accuracy {_ci(near, 'balanced_accuracy')}."
            if "auc" in near
            else ""
        )
        lines.append(
            f"Near-duplicates of images the run trained on (cosine >= {near['threshold']:g} of the embeddings): "
            f"{near['images']}, left out of the figures above (an external image is only external if it is "
            f"unseen).{scored}"
        )
    sections = [
        lines,
        clinical_section(metrics, run_test, own),
        subgroups_section(metrics, "scored rows"),
        per_class_section(metrics, "scored rows"),
        confusion_section(metrics, "scored rows"),
        plots_section(list(SHARED_PLOTS)),
        ["Files: `metrics.json` (every figure), `predictions.csv` (with the run's decision)."],
    ]
    write_text(folder / "report.md", "\n\n".join("\n".join(section) for section in sections if section) + "\n")


def title_section(config: dict, title: str) -> list[str]:
    return [
        f"# Run report: {title}",
        "",
        f"Store `{config['features']}`, split `{config['split']}` (lesion-grouped, stratified; the test rows "
        f"were never trained or tuned on), views `{config['views']}`, metadata `{config['meta'] or 'none'}`.",
    ]


def license_section(extraction: dict[str, dict]) -> list[str]:
    """The licence of each backbone's weights, where the store recorded one, with a warning for weights
    that are not openly licensed: a reader of the figures should know what the model may be used for."""
    recorded = {b: r["license"] for b, r in extraction.items() if r.get("license")}
    if not recorded:
        return []
    lines = ["Weights licence: " + ", ".join(f"{b} `{lic}`" for b, lic in recorded.items()) + "."]
    for backbone, lic in recorded.items():
        caveat = license_caveat(str(lic))
        if caveat:
            lines += ["", f"> **Warning: the {backbone} weights: {caveat}.**"]
    return lines


def headline_section(metrics: dict, second: dict, second_label: str, notes: list[str]) -> list[str]:
    """The table of the test figures, a second scored part's and the majority-class baseline's."""
    warned = bool(metrics.get("warning"))
    test = metrics["test"]
    lines = [
        "## Headline",
        "",
        *([f"> **Warning: {metrics['warning']}.** Every figure below is marked by it.", ""] if warned else []),
        "| | balanced accuracy (95 % CI) | AUC (95 % CI) | accuracy | ECE | n (lesions) |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| test{' (too few lesions: see the warning)' if warned else ''} | {_ci(test, 'balanced_accuracy')} "
        f"| {_ci(test, 'auc')} | {_fmt(test['accuracy'])} | "
        f"{_fmt(test['ece'])} | {test['n']} ({test['lesions']}) |",
        f"| {second_label} | {_ci(second, 'balanced_accuracy')} | {_ci(second, 'auc')} | "
        f"{_fmt(second['accuracy'])} | {_fmt(second['ece'])} | {second['n']} ({second['lesions']}) |",
        f"| majority class ({test['baseline']['class']}), test | {_fmt(test['baseline']['balanced_accuracy'])} "
        f"| 0.500 | {_fmt(test['baseline']['accuracy'])} | | |",
        "",
        "Intervals: 95 % bootstrap over lesions (1000 resamples of lesion groups, not of images).",
        *notes,
    ]
    if "sensitivity_at_specificity" in test:
        s = test["sensitivity_at_specificity"]
        lines += [
            "",
            f"Sensitivity for `{test['positive']}` on the test rows: {_fmt(s['0.80'])} at 80 % specificity, "
            f"{_fmt(s['0.90'])} at 90 % specificity.",
        ]
    return lines


def _value(figure: dict | None) -> str:
    """A {value, ci} figure as `0.812 (0.77-0.85)`."""
    if not figure:
        return "n/a"
    ci = figure.get("ci") or []
    return f"{_fmt(figure['value'])} ({_fmt(ci[0])}-{_fmt(ci[1])})" if len(ci) == 2 else _fmt(figure["value"])


def clinical_section(test: dict, second: dict, second_label: str) -> list[str]:
    """The positive class against the rest as a clinical paper reports it: sensitivity and specificity at
    the threshold chosen beforehand (on the out-of-fold rows), specificity at 95 % sensitivity, partial
    AUC above 80 % TPR; and the malignant-vs-benign roll-up of a multi-class run."""
    if "pauc_80" not in test:
        return []
    lines = ["## Clinical figures", ""]
    point = test.get("operating_point")
    if point:
        lines += [
            f"Operating point: `{test['positive']}` when its probability is at least {_fmt(point['threshold'])}, "
            f"the threshold of rule `{point['rule']}` on the out-of-fold predictions of the study rows, fixed "
            "before any test row was scored; on the test rows its sensitivity and specificity are what they "
            "are, not the rule's target.",
            "",
        ]
    header = "| | sensitivity at the threshold | specificity at the threshold " if point else "| "
    lines += [
        header + "| specificity at 95 % sensitivity | pAUC above 80 % TPR (0-0.2) |",
        "| --- |" + (" --- | --- |" if point else "") + " --- | --- |",
    ]
    for label, m in (("test", test), (second_label, second)):
        if "pauc_80" not in m:
            continue
        at = m.get("operating_point") or {}
        cells = f" {_value(at.get('sensitivity'))} | {_value(at.get('specificity'))} |" if point else ""
        lines.append(f"| {label} |{cells} {_value(m['spec_at_95_sens'])} | {_value(m['pauc_80'])} |")
    rollup = test.get("malignant_vs_benign")
    if rollup:
        lines += [
            "",
            f"Malignant ({', '.join(rollup['malignant'])}) against benign, test rows: AUC {_fmt(rollup['auc'])}, "
            f"specificity at 95 % sensitivity {_value(rollup['spec_at_95_sens'])}, pAUC above 80 % TPR "
            f"{_value(rollup['pauc_80'])}.",
        ]
    return lines


def calibration_section(test: dict, second: dict, second_label: str) -> list[str]:
    """ECE and Brier score before and after the run's calibration."""
    if "calibration" not in test:
        return []
    c = test["calibration"]
    how = {
        "none": "none: the probabilities are the head's own",
        "temperature": f"temperature scaling, T = {_fmt(c.get('temperature'), 2)}",
        "isotonic": "isotonic regression per class",
    }[c["method"]]
    lines = [
        "## Calibration",
        "",
        f"Calibration: {how}, fitted on the out-of-fold predictions only; every probability of the run "
        "(its CSVs, `predict`, `evaluate`) is calibrated.",
        "",
        "| | ECE before | ECE after | Brier before | Brier after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, m in (("test", test), (second_label, second)):
        if "calibration" in m:
            k = m["calibration"]
            lines.append(
                f"| {label} | {_fmt(k['ece_before'])} | {_fmt(k['ece_after'])} | {_fmt(k['brier_before'])} "
                f"| {_fmt(k['brier_after'])} |"
            )
    return lines


def ood_section(test: dict) -> list[str]:
    """How many test rows the run's out-of-distribution flag would set aside: images of the run's own
    population should rarely be flagged (the threshold is set at a percentile of unseen study rows)."""
    ood = test.get("ood")
    if not ood:
        return []
    return [
        "## Out of distribution",
        "",
        f"Out of distribution: {ood['flagged']} of {ood['rows']} test rows ({100 * ood['share']:.1f} %) score "
        f"beyond the threshold ({ood['percentile']:g}th percentile of the out-of-fold scores, "
        f"{_fmt(ood['threshold'], 1)}: the smallest squared Mahalanobis distance of a row's embedding to a "
        "class mean). `predict` flags new images beyond it (`in_distribution` false; with `--abstain-ood` "
        "their decision is `abstain`).",
    ]


def subgroups_section(scored: dict, rows_named: str = "test rows") -> list[str]:
    """Per metadata column, the figures of each of its groups, the widest sensitivity gap first."""
    from classify.subgroups import MIN_LESIONS, worst_gap

    columns = scored.get("subgroups") or {}
    if not columns:
        return []
    lines = [f"## Subgroups ({rows_named})", ""]
    for column, rows in columns.items():
        gap = worst_gap(rows)
        if gap:
            by_group = {r["group"]: r["sensitivity"]["value"] for r in rows if r["sensitivity"]}
            lines.append(
                f"**{column}**: worst-group gap in sensitivity at the operating point {_fmt(gap['gap'])} "
                f"(`{gap['lowest']}` {_fmt(by_group[gap['lowest']])}, `{gap['highest']}` "
                f"{_fmt(by_group[gap['highest']])})."
            )
        else:
            lines.append(f"**{column}**: fewer than two groups can be judged, so no gap is given.")
        lines += [
            "",
            f"| {column} | images | lesions | positive rate | AUC | balanced accuracy | sensitivity | specificity |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            rate = _fmt(r["positive_rate"]) if r["positive_rate"] is not None else "n/a"
            if r["judged"]:
                judged = " | ".join(_value(r[k]) for k in ("auc", "balanced_accuracy", "sensitivity", "specificity"))
            else:
                judged = f"too few to judge (< {MIN_LESIONS} lesions of a class) | | |"
            lines.append(f"| {r['group']} | {r['images']} | {r['lesions']} | {rate} | {judged} |")
        lines.append("")
    return lines[:-1]


def per_class_section(test: dict, rows_named: str = "test rows") -> list[str]:
    lines = [
        f"## Per class ({rows_named})",
        "",
        "| class | support | sensitivity | specificity | precision | AUC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, m in test["per_class"].items():
        lines.append(
            f"| {c} | {m['support']} | {_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | "
            f"{_fmt(m['precision'])} | {_fmt(m['auc'])} |"
        )
    return lines


def confusion_section(test: dict, rows_named: str = "test rows") -> list[str]:
    lines = [
        f"Confusion matrix (rows: true class, columns: predicted), {rows_named}:",
        "",
        "| | " + " | ".join(test["classes"]) + " |",
        "| --- |" + " --- |" * len(test["classes"]),
    ]
    for c, row in zip(test["classes"], test["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    return lines


def data_section(metrics: dict, counts: dict) -> list[str]:
    """Rows per class in each part, and the labelled rows the split left out and why."""
    lines = ["## Data", "", "| class | study rows | test rows |", "| --- | --- | --- |"]
    for c in sorted(set(counts["study"]) | set(counts["test"])):
        lines.append(f"| {c} | {counts['study'].get(c, 0)} | {counts['test'].get(c, 0)} |")
    dropped = metrics.get("left_out") or {}
    if dropped:
        left_out = f"{sum(dropped.values())} ({', '.join(f'{n} {reason}' for reason, n in dropped.items())})."
    else:
        left_out = "none."
    return lines + ["", "Labelled rows left out of the split: " + left_out]


def plots_section(plots: list[tuple[str, str]]) -> list[str]:
    """The plots (file name under plots/, alt text), two to a line."""
    images = [f"![{alt}]({PLOTS}/{name})" for name, alt in plots]
    return ["## Plots", ""] + [" ".join(images[i : i + 2]) for i in range(0, len(images), 2)]


def files_section(kind_files: list[str]) -> list[str]:
    files = ["`metrics.json` (every figure)", "`test_predictions.csv` (ISIC style)", "`config.json`", *kind_files]
    return ["Files: " + ", ".join(files) + ", `run.json` (the fitted head's card)."]


def study_section(config: dict, trials: list[dict]) -> list[str]:
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"].lower()] = states.get(t["state"].lower(), 0) + 1
    return [
        "## Study",
        "",
        f"Study `{config['study']}`: {len(trials)} trials ("
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        + f"), seeded TPE, median pruner. Best parameters: `{config['params']}`.",
    ]


def label_efficiency_section(rows: list[dict]) -> list[str]:
    """The test figures of the runs on growing shares of the study lesions (`fit --fractions`)."""
    if not rows:
        return []
    lines = [
        "## Label efficiency (test rows)",
        "",
        "The same study recipe (head, trials, folds, seed, calibration, operating point) on nested shares of "
        "the study lesions, taken whole per class and fold; every run is scored on the same test rows. "
        "Intervals: 95 %, lesion-grouped bootstrap.",
        "",
        "| share of study lesions | lesions | images | AUC | balanced accuracy | run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['share']:g} | {r['study_lesions']} | {r['study_images']} | {_ci(r, 'auc')} | "
            f"{_ci(r, 'balanced_accuracy')} | `{r['run']}` |"
        )
    return lines


def training_section(config: dict, epochs: list[dict]) -> list[str]:
    lines = [
        "## Training",
        "",
        f"Unfrozen blocks: {config['unfreeze']} (batch-norm statistics: {config['bn']}); from "
        f"{'the head of ' + config['init'] if config.get('init') else 'a fresh head'}; AdamW (head {config['lr']}, "
        f"backbone {config['backbone_lr']}), warm-up and cosine decay, {config['precision']}. "
        f"Best epoch: {config['best_epoch']}, chosen by validation AUC (epoch 0 is the model as initialised). "
        + decision_sentence(config.get("decision")),
        "",
        "| epoch | training loss | images/s | validation balanced accuracy | validation AUC |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in epochs:
        lines.append(
            f"| {e['epoch']} | {_fmt(e['loss'], 4)} | {_fmt(e['images_per_s'], 1)} | "
            f"{_fmt(e['val_balanced_accuracy'])} | {_fmt(e['val_auc'])} |"
        )
    return lines


def decision_sentence(decision: dict | None) -> str:
    """How the fine-tuned head decides: the rule set on validation after the epoch was chosen."""
    if not decision:
        return ""
    if "threshold" in decision:
        ((positive, threshold),) = decision["threshold"].items()
        return (
            f"Decision: `{positive}` when its probability exceeds {threshold:.3f} (set on the validation rows "
            "for the best balanced accuracy, after the epoch was chosen; folded into the head)."
        )
    offsets = ", ".join(f"{c} {b:+.2f}" for c, b in zip(decision["classes"], decision["offsets"]))
    return (
        f"Decision: argmax of the log-probabilities plus {offsets} (set on the validation rows for the best "
        "balanced accuracy, after the epoch was chosen; folded into the head)."
    )


def _confusion(path: Path, matrix: np.ndarray, classes: list[str]) -> None:
    """Counts with each true class's shares beside them, shaded by share so that a small class's errors
    show as plainly as a large one's."""
    n = len(classes)
    totals = matrix.sum(axis=1, keepdims=True)
    shares = matrix / np.where(totals > 0, totals, 1)
    side = max(4.5, 1.6 + 0.75 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    size = 10 if n <= 5 else 8 if n <= 8 else 7
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{v}\n{100 * shares[i, j]:.0f} %",
            ha="center",
            va="center",
            fontsize=size,
            color="white" if shares[i, j] > 0.6 else "black",
        )
    ax.set_xticks(range(n), classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row shares)")
    ax.set_title("confusion matrix (test)", fontsize=11)
    _save(fig, path)


def _curves(
    path: Path, y: np.ndarray, proba: np.ndarray, classes: list[str], scored: dict, positive: str | None
) -> None:
    """ROC and precision-recall, one class against the rest (two classes: the positive one), with the
    AUC (and its interval where the figures have one) in the legend and the run's operating point marked."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.8))
    shown = classes if len(classes) > 2 else [positive or classes[1]]
    operating = scored.get("operating_point") or {}
    for c in shown:
        k = classes.index(c)
        truth = y == c
        if not truth.any() or truth.all():
            continue
        fpr, tpr, _ = roc_curve(truth, proba[:, k])
        auc = (scored.get("per_class") or {}).get(c, {}).get("auc")
        interval = scored.get("ci95", {}).get("auc") if len(classes) == 2 else None
        label = f"{c}: AUC {_fmt(auc)}" + (f" ({_fmt(interval[0])}-{_fmt(interval[1])})" if interval else "")
        line = roc_ax.plot(fpr, tpr, label=label)[0]
        precision, recall, _ = precision_recall_curve(truth, proba[:, k])
        ap = average_precision_score(truth, proba[:, k])
        pr_ax.plot(recall, precision, color=line.get_color(), label=f"{c}: average precision {ap:.3f}")
        if operating and c == positive:
            decided = proba[:, k] >= operating["threshold"]
            sens, spec = np.mean(decided[truth]), np.mean(~decided[~truth])
            prec = np.mean(truth[decided]) if decided.any() else np.nan
            mark = f"operating point ({operating.get('rule') or 'set'}: threshold {operating['threshold']:.3f})"
            roc_ax.plot(1 - spec, sens, marker="*", markersize=14, color="black", linestyle="", label=mark)
            pr_ax.plot(sens, prec, marker="*", markersize=14, color="black", linestyle="", label=mark)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    roc_ax.set_xlabel("1 - specificity")
    roc_ax.set_ylabel("sensitivity")
    roc_ax.set_title("ROC (test)", fontsize=11)
    roc_ax.legend(loc="lower right", fontsize=8)
    pr_ax.set_xlabel("recall (sensitivity)")
    pr_ax.set_ylabel("precision")
    pr_ax.set_ylim(0, 1.02)
    pr_ax.set_title("precision-recall (test)", fontsize=11)
    pr_ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


def _reliability(
    path: Path, y: np.ndarray, proba: np.ndarray, classes: list[str], before: np.ndarray | None = None
) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    curves = [("calibrated", proba), ("before calibration", before)] if before is not None else [("", proba)]
    for label, p in curves:
        confidence = p.max(axis=1)
        correct = np.array(classes, dtype=object)[p.argmax(axis=1)] == y
        binned = reliability_bins(correct, confidence)  # the bins of the ECE in metrics.json
        dots = ax.scatter(binned.confidence, binned.accuracy, s=20 + 200 * binned.size / max(1, len(y)))
        ax.plot(binned.confidence, binned.accuracy, color=dots.get_facecolor()[0], label=label or None)
    if before is not None:
        ax.legend(loc="upper left")
    ax.set_xlabel("confidence of the predicted class")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability (test)")
    _save(fig, path)


def _history(path: Path, trials: list[dict]) -> None:
    """The best value so far as a step line, complete trials as dots and pruned ones as crosses at the
    last value they reported (where they were stopped)."""
    done = [t for t in trials if t["value"] is not None]
    pruned = [t for t in trials if t["state"] == "PRUNED" and t.get("pruned_at") is not None]
    early = [t["number"] for t in trials if t["state"] == "PRUNED" and t.get("pruned_at") is None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if done:
        numbers = [t["number"] for t in done]
        values = [t["value"] for t in done]
        ax.scatter(numbers, values, label=f"complete ({len(done)})", zorder=3)
        last = max(t["number"] for t in trials)
        best = np.maximum.accumulate(values)
        ax.step([*numbers, last], [*best, best[-1]], where="post", color="red", label="best so far")
    if pruned:
        ax.scatter(
            [t["number"] for t in pruned],
            [t["pruned_at"] for t in pruned],
            marker="x",
            color="grey",
            label=f"pruned ({len(pruned)}), at its last fold",
            zorder=3,
        )
    if early:  # no fold finished: no score to place them at, so a tick on the axis
        ax.plot(
            early,
            [0] * len(early),
            marker="|",
            markersize=12,
            linestyle="",
            color="grey",
            transform=ax.get_xaxis_transform(),
            label=f"pruned in its first fold ({len(early)})",
        )
    if done or pruned or early:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("trial")
    ax.set_ylabel("cv balanced accuracy")
    ax.set_title("optimisation history", fontsize=11)
    _save(fig, path)


def _efficiency(path: Path, rows: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    shares = np.array([r["share"] for r in rows])
    for key, label in (("auc", "test AUC"), ("balanced_accuracy", "test balanced accuracy")):
        values = np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=float)
        interval = np.array([r["ci95"].get(key) or [np.nan, np.nan] for r in rows], dtype=float)
        error = np.abs(np.stack([values - interval[:, 0], interval[:, 1] - values]))
        ax.errorbar(shares, values, yerr=np.nan_to_num(error), marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(shares, [f"{s:g}\n({r['study_lesions']})" for s, r in zip(shares, rows)])
    ax.minorticks_off()
    ax.set_xlabel("share of the study lesions (lesions)")
    ax.legend(loc="lower right")
    ax.set_title("label efficiency (95 % intervals)")
    _save(fig, path)


def _epochs(path: Path, epochs: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    numbers = [e["epoch"] for e in epochs]
    ax.plot(numbers, [e["val_balanced_accuracy"] for e in epochs], marker="o", label="validation balanced accuracy")
    ax.plot(numbers, [e["val_auc"] for e in epochs], marker="o", label="validation AUC")
    ax.set_xlabel("epoch")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title("fine-tuning")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
