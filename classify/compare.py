"""`cli.py compare RUN_A RUN_B [...]`: is run B really better than run A on the same test rows?

Runs are compared only when they were scored on the same test rows: the same image ids, holding the
same files (SHA-256 from each run's split.npz), with the same classes; anything else is refused with the
reason. Each run's test figures (AUC and balanced accuracy, as in its metrics.json) stand side by side,
and every run is set against the first by a paired lesion-grouped bootstrap: each resample draws the
lesions once and weights both runs' rows alike (`metrics.resample_weights`), so the spread of the
difference is that of the difference, not of two independent figures (which would overstate it, since
both runs err on the same hard lesions). The p-value is two-sided: twice the share of resamples in
which the difference falls on the other side of zero (at most 1; "< 1/reps" when none does).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classify.metrics import BOOTSTRAP, ResampledScores, resample_weights
from classify.runs import Run, RunError, load_run, read_run_split
from features.store import FeatureStore

__all__ = ["Compared", "compare_runs", "comparison_markdown"]


@dataclass
class Compared:
    """One run's test predictions, as compared."""

    run: Run
    ids: np.ndarray
    proba: np.ndarray
    sha256: dict[str, str]

    @property
    def name(self) -> str:
        return str(self.run.folder)


def _load(folder: str | Path) -> Compared:
    run = load_run(folder)
    path = run.folder / "test_predictions.csv"
    if not path.is_file():
        raise RunError(f"{path}: missing; the run folder is incomplete")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids = np.array([r["image"] for r in rows], dtype=object)
    proba = np.array([[float(r[c]) for c in run.classes] for r in rows]).reshape(len(rows), len(run.classes))
    split = read_run_split(run.folder)
    sha256 = dict(zip(split.image_id, split.sha256)) if split is not None else {}
    return Compared(run, ids, proba, sha256)


def _same_rows(first: Compared, other: Compared) -> None:
    """Refuse runs that were not scored on the same test rows, saying how they differ."""
    if first.run.classes != other.run.classes:
        raise RunError(
            f"{other.name} has classes {', '.join(other.run.classes)}, {first.name} "
            f"{', '.join(first.run.classes)}: runs of other classes cannot be compared"
        )
    mine, theirs = set(first.ids), set(other.ids)
    if mine != theirs:
        only_first, only_other = sorted(mine - theirs), sorted(theirs - mine)
        raise RunError(
            f"{other.name} was scored on other test rows than {first.name}: {len(only_first)} of {first.name}'s "
            f"test images are not among its own{f' (e.g. {only_first[0]})' if only_first else ''}, and "
            f"{len(only_other)} of its own are not among {first.name}'s"
            f"{f' (e.g. {only_other[0]})' if only_other else ''}; compare runs fitted on one split of one store"
        )
    changed = [i for i in first.ids if first.sha256.get(i, "") != other.sha256.get(i, "")]
    if changed:
        raise RunError(
            f"{other.name} and {first.name} name the same test images but {len(changed)} of them are other files "
            f"(SHA-256 differs, e.g. {changed[0]}): the runs did not score the same images"
        )


def _truth(run: Run, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and lesion groups of the test images, from the run's store."""
    path = Path(run.card["store"])
    if not path.is_file():
        raise RunError(f"{run.folder}: its store {path} is not here (it holds the test labels); put it back there")
    samples = FeatureStore(path).samples()
    label_of = dict(zip(samples.image_id, samples.label))
    group_of = dict(zip(samples.image_id, samples.group))
    missing = [i for i in ids if i not in label_of]
    if missing:
        raise RunError(f"{path}: has no row for test image {missing[0]} of {run.folder} ({len(missing)} missing)")
    return np.array([label_of[i] for i in ids], dtype=object), np.array([group_of[i] for i in ids], dtype=object)


def _delta(values: list[float], point: float, reps: int) -> dict:
    d = np.asarray([v for v in values if not np.isnan(v)])
    if not len(d):
        return {"value": point, "ci": [], "p_value": None}
    p = min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))
    return {"value": point, "ci": [float(v) for v in np.percentile(d, [2.5, 97.5])], "p_value": float(p)}


def compare_runs(folders: list[str | Path], *, reps: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Every run's test AUC and balanced accuracy with its interval, and each run against the first:
    `delta_auc` and `delta_balanced_accuracy` (this run minus the first), each with a paired
    lesion-grouped 95 % interval and two-sided p-value."""
    if len(folders) < 2:
        raise RunError("compare: name at least two run folders")
    runs = [_load(f) for f in folders]
    first = runs[0]
    for other in runs[1:]:
        _same_rows(first, other)
    ids = first.ids
    y, groups = _truth(first.run, ids)
    classes = first.run.classes
    scorers = []
    for r in runs:
        order = {image_id: k for k, image_id in enumerate(r.ids)}
        scorers.append(ResampledScores(y, r.proba[[order[i] for i in ids]], classes))
    points = [s(np.ones(len(ids))) for s in scorers]
    samples: list[list[tuple[float, float] | None]] = [[] for _ in runs]
    for weight in resample_weights(groups, reps, seed):
        figures = [s(weight) for s in scorers]
        for k, f in enumerate(figures):
            samples[k].append(f)

    def ci(values: list[float]) -> list[float]:
        kept = [v for v in values if not np.isnan(v)]
        return [float(v) for v in np.percentile(kept, [2.5, 97.5])] if kept else []

    result: dict = {"rows": int(len(ids)), "lesions": int(len(set(groups))), "resamples": reps, "runs": []}
    for r, point, drawn in zip(runs, points, samples):
        kept = [f for f in drawn if f is not None]
        result["runs"].append(
            {
                "run": r.name,
                "head": r.run.card.get("head"),
                "backbones": list(r.run.inputs.backbones),
                "balanced_accuracy": {"value": point[0], "ci": ci([f[0] for f in kept])},
                "auc": {"value": point[1], "ci": ci([f[1] for f in kept])},
            }
        )
    result["against_first"] = []
    for k in range(1, len(runs)):
        pairs = [(a, b) for a, b in zip(samples[0], samples[k]) if a is not None and b is not None]
        result["against_first"].append(
            {
                "run": runs[k].name,
                "first": first.name,
                "delta_auc": _delta([b[1] - a[1] for a, b in pairs], points[k][1] - points[0][1], reps),
                "delta_balanced_accuracy": _delta([b[0] - a[0] for a, b in pairs], points[k][0] - points[0][0], reps),
            }
        )
    return result


def _fmt(figure: dict) -> str:
    ci = figure.get("ci") or []
    return f"{figure['value']:.3f} ({ci[0]:.3f} to {ci[1]:.3f})" if len(ci) == 2 else f"{figure['value']:.3f}"


def _p(p: float | None, reps: int) -> str:
    if p is None:
        return "n/a"
    return f"< {1 / reps:.3g}" if p == 0 else f"{p:.3f}"


def comparison_markdown(result: dict) -> str:
    """The comparison as a short markdown report."""
    lines = [
        "# Comparison of runs on the same test rows",
        "",
        f"{result['rows']} test images ({result['lesions']} lesions), the same in every run (ids and file "
        f"contents checked). Intervals: 95 %, {result['resamples']} lesion-grouped bootstrap resamples; the "
        "differences are paired (the same resamples for both runs).",
        "",
        "| run | head | backbones | test AUC (95 % CI) | test balanced accuracy (95 % CI) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        lines.append(
            f"| `{r['run']}` | {r['head']} | {', '.join(r['backbones'])} | {_fmt(r['auc'])} "
            f"| {_fmt(r['balanced_accuracy'])} |"
        )
    lines += [
        "",
        "| against the first | AUC difference (95 % CI) | p | balanced accuracy difference (95 % CI) | p |",
        "| --- | --- | --- | --- | --- |",
    ]
    for d in result["against_first"]:
        auc, ba = d["delta_auc"], d["delta_balanced_accuracy"]
        lines.append(
            f"| `{d['run']}` - `{d['first']}` | {_fmt(auc)} | {_p(auc['p_value'], result['resamples'])} "
            f"| {_fmt(ba)} | {_p(ba['p_value'], result['resamples'])} |"
        )
    return "\n".join(lines) + "\n"
