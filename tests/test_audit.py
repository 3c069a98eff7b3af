"""The duplicate audit: exact and near duplicates, their clusters, split leaks, label conflicts, and the
agreement of its pairs with lesion groups, on synthetic stores with planted duplicates."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import synthetic_store

from classify.audit import audit, write_audit
from features.duplicates import (
    DEFAULT_THRESHOLD,
    Pairs,
    Screen,
    array_blocks,
    clusters,
    exact_pairs,
    group_agreement,
    near_pairs,
    store_near_pairs,
)
from features.splits import TEST, UNUSED, SplitSpec, split_for
from features.store import FeatureStore, write_arrays

BACKBONE = "fake"


def brute_force(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Every pair i < j at or above the threshold, from the whole N x N matrix at once."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1)
    i, j = np.nonzero(np.triu(unit @ unit.T >= threshold, 1))
    return set(zip(i.tolist(), j.tolist()))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass
class Planted:
    path: Path
    ids: list[str]
    split: np.ndarray
    exact: tuple[int, int]
    leak: tuple[int, int]
    conflict: tuple[int, int]


@pytest.fixture
def planted(tmp_path: Path) -> Planted:
    """A 120-row store (60 lesions of two images) with three planted findings:
    - exact: two rows of other lesions, on one side of the default split, holding the same file (SHA-256),
      although their embeddings differ;
    - leak: a row moved to a lesion of its own whose embedding is a copy (plus 1e-3 noise) of a row on the
      other side of the default split;
    - conflict: a row relabelled, its embedding a near copy of the other image of its lesion."""
    base = FeatureStore(synthetic_store(tmp_path / "base.h5", dim=64))
    samples, x, attrs = base.samples(), base.embeddings(BACKBONE), base.backbone_attrs(BACKBONE)
    leaked, relabelled = 7, 20
    samples.group[leaked] = "LEAK"
    samples.label[relabelled] = "nv" if samples.label[relabelled] == "mel" else "mel"
    # The split depends on labels and groups only, so it is known before the embeddings are planted.
    write_arrays(tmp_path / "labels.h5", samples, {BACKBONE: (x, attrs)})
    split = split_for(FeatureStore(tmp_path / "labels.h5"), SplitSpec())
    test = split == TEST
    source = next(
        r
        for r in range(len(x))
        if r not in (6, leaked)
        and test[r] != test[leaked]
        and split[r] != UNUSED
        and samples.label[r] == samples.label[leaked]
    )
    rng = np.random.default_rng(1)
    x[leaked] = x[source] + rng.normal(0, 1e-3, x.shape[1])
    x[relabelled] = x[21] + rng.normal(0, 1e-3, x.shape[1])
    a = 30
    b = next(r for r in range(40, len(x)) if split[r] == split[a])
    samples.sha256[b] = samples.sha256[a]
    path = tmp_path / "planted.h5"
    write_arrays(path, samples, {BACKBONE: (x, attrs)})
    assert np.array_equal(split_for(FeatureStore(path), SplitSpec()), split)
    return Planted(path, samples.image_id, split, (a, b), tuple(sorted((source, leaked))), (relabelled, 21))


def test_the_audit_finds_the_planted_duplicates_leak_and_conflict(planted: Planted, tmp_path: Path):
    result = audit(planted.path)
    out = write_audit(result, tmp_path / "out")
    ids, name = planted.ids, SplitSpec().name
    a, b = planted.exact
    p, q = planted.leak
    c, d = sorted(planted.conflict)
    pairs = {(r["image_a"], r["image_b"]): r for r in read_csv(out / "pairs.csv")}
    assert set(pairs) == {(ids[a], ids[b]), (ids[p], ids[q]), (ids[c], ids[d])}
    exact, leak, conflict = pairs[ids[a], ids[b]], pairs[ids[p], ids[q]], pairs[ids[c], ids[d]]
    assert (exact["kind"], exact["same_group"], exact["crosses_split"]) == ("exact", "no", "")
    assert float(exact["similarity"]) < DEFAULT_THRESHOLD  # exact by its file, whatever its embedding
    assert (leak["kind"], leak["same_group"], leak["crosses_split"]) == ("near", "no", name)
    assert float(leak["similarity"]) > 0.999
    assert (conflict["kind"], conflict["same_group"], conflict["crosses_split"]) == ("near", "yes", "")

    members = read_csv(out / "clusters.csv")
    by_cluster: dict[str, set[str]] = {}
    for row in members:
        by_cluster.setdefault(row["cluster"], set()).add(row["image_id"])
    assert sorted(map(sorted, by_cluster.values())) == sorted(
        sorted([ids[i], ids[j]]) for i, j in (planted.exact, planted.leak, planted.conflict)
    )
    side = {row["image_id"]: row["side"] for row in members}
    assert {side[ids[p]], side[ids[q]]} == {"test", "study"}
    labels = {row["image_id"]: row["label"] for row in members}
    assert labels[ids[c]] != labels[ids[d]]

    assert [sorted(np.flatnonzero(result.cluster == k)) for k in result.crossing(name)] == [[p, q]]
    assert [sorted(np.flatnonzero(result.cluster == k)) for k in result.conflicts()] == [[c, d]]
    # a cluster with both images in the test part is no leak, but weighs twice in the test figures
    in_test = [sorted(pair) for pair in (planted.exact, planted.conflict) if planted.split[pair[0]] == TEST]
    repeated = [sorted(np.flatnonzero(result.cluster == k)) for k in result.repeated_in_test(name)]
    assert sorted(repeated) == sorted(in_test)
    summary = (out / "summary.md").read_text()
    assert "| exact duplicate pairs (same SHA-256) | 1 |" in summary
    assert "| near-duplicate pairs (not exact) | 2 |" in summary
    assert "| clusters (2 or more rows, joined by either kind) | 3 (6 rows) |" in summary
    assert f"| clusters crossing split `{name}` (test and study rows) | 1 |" in summary
    assert "| clusters with a label conflict | 1 |" in summary
    assert f"| clusters repeated inside the test part of `{name}` | {len(in_test)} |" in summary
    # Two pairs at or above the threshold, one of them a lesion's two images; 60 lesions of two images,
    # less the one whose image was moved to a lesion of its own: 59 pairs of one lesion.
    assert (result.agreement.pairs, result.agreement.hits, result.agreement.group_pairs) == (2, 1, 59)
    assert "precision 0.500 (1 of 2 pairs are one lesion), recall 0.017 (of 59 pairs" in summary


def test_clusters_are_judged_against_each_side_of_a_split():
    from classify.audit import Audit

    # clusters 1: test+study (a leak), 2: two test rows (repeated in the test figures), 3: study only,
    # 4: one test row and one unused row (neither)
    cluster = np.array([1, 1, 2, 2, 3, 3, 4, 4, 0])
    split = np.array([TEST, 0, TEST, TEST, 1, 2, TEST, UNUSED, TEST], dtype=np.int8)
    empty = np.zeros(0, np.int64)
    result = Audit(
        path=Path("s.h5"),
        backbone="b",
        threshold=0.95,
        searched=np.arange(9),
        image_id=np.array([f"i{k}" for k in range(9)]),
        label=np.array(["mel"] * 9),
        group=np.array([""] * 9),
        pairs=Pairs(empty, empty, np.zeros(0, np.float32)),
        exact=np.zeros(0, bool),
        cluster=cluster,
        splits={"s": split},
    )
    assert result.crossing("s") == [1]
    assert result.repeated_in_test("s") == [2]


def test_blockwise_search_equals_all_pairs_at_once():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (53, 6)).astype(np.float32)
    x[40] = x[2] + 0.01  # pairs across blocks, inside one block, and a zero row (similar to nothing)
    x[5] = x[4] * 3
    x[17] = 0
    for block_rows, outer in ((1, 1), (4, 1), (4, 3), (7, 2), (53, 4), (100, 1)):
        found = near_pairs(array_blocks(x, block_rows), 0.6, outer_blocks=outer)
        got = set(zip(found.first.tolist(), found.second.tolist()))
        assert got == brute_force(x, 0.6)
        assert {(2, 40), (4, 5)} <= got and len(got) == len(found)
        assert np.all(found.first < found.second) and np.all(found.similarity >= 0.6)


def test_the_bfloat16_screen_misses_no_pair_at_the_threshold():
    # rows whose cosines to row 0 straddle the threshold by less than bfloat16's rounding: the screen
    # must pass them all on, and the float32 measure decide, exactly as a float32 search does
    rng = np.random.default_rng(4)
    dim, threshold = 512, 0.95
    base = rng.normal(0, 1, dim)
    base /= np.linalg.norm(base)
    other = rng.normal(0, 1, (200, dim))
    other -= np.outer(other @ base, base)
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    cosines = threshold + np.linspace(-0.004, 0.004, 200)
    x = np.vstack([base, cosines[:, None] * base + np.sqrt(1 - cosines[:, None] ** 2) * other]).astype(np.float32)
    low = near_pairs(array_blocks(x, 16), threshold, screen=Screen("cpu", "bfloat16"))
    exact = near_pairs(array_blocks(x, 16), threshold, screen=Screen("cpu", "float32"))
    expected = brute_force(x, threshold)
    assert 90 < sum(1 for i, _ in expected if i == 0) < 110
    assert set(zip(low.first.tolist(), low.second.tolist())) == expected
    assert set(zip(exact.first.tolist(), exact.second.tolist())) == expected
    assert np.array_equal(low.similarity, exact.similarity)


def test_the_search_over_a_store_reads_blocks_and_equals_all_pairs(tmp_path: Path):
    store = FeatureStore(synthetic_store(tmp_path / "s.h5", n=90, dim=8))
    x = store.embeddings(BACKBONE)
    rows = np.flatnonzero(np.arange(90) % 4 != 1)  # some rows left out: positions map back to store rows
    found = store_near_pairs(store, BACKBONE, rows, 0.7, block_rows=3)
    expected = {(int(rows[i]), int(rows[j])) for i, j in brute_force(x[rows], 0.7)}
    assert len(expected) > 20
    assert set(zip(found.first.tolist(), found.second.tolist())) == expected
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(found.similarity, np.einsum("ij,ij->i", unit[found.first], unit[found.second]), atol=1e-5)


def test_exact_pairs_ignore_blank_hashes_and_clusters_join_chains():
    first, second = exact_pairs(np.array(["h1", "", "h2", "h1", "", "h1"]))
    assert list(zip(first.tolist(), second.tolist())) == [(0, 3), (0, 5), (3, 5)]
    # a~b, b~c: one cluster of three although a and c are not a pair; numbered from the largest down
    labels = clusters(8, np.array([1, 2, 6]), np.array([2, 4, 7]))
    assert labels.tolist() == [0, 1, 1, 0, 1, 0, 2, 2]


def test_precision_and_recall_against_groups_by_hand():
    groups = np.array(["g1", "g1", "g1", "g2", "g2", "g3", ""])
    # pairs of one group among the searched rows 0..6: g1 has 3 (0-1, 0-2, 1-2), g2 has 1 (3-4)
    pairs = Pairs(np.array([0, 0, 3, 2, 5]), np.array([1, 3, 4, 5, 6]), np.ones(5, np.float32))
    agreement = group_agreement(pairs, groups, np.arange(7))
    # (5, 6): group of 6 unknown, left out; (0, 1) and (3, 4) are hits of the 4 kept pairs
    assert (agreement.pairs, agreement.hits, agreement.group_pairs) == (4, 2, 4)
    assert agreement.precision == 0.5 and agreement.recall == 0.5


def test_every_stored_split_is_judged(planted: Planted):
    n = len(planted.ids)
    other = np.where(np.arange(n) % 2 == 0, TEST, 0).astype(np.int8)
    with h5py.File(planted.path, "r+") as f:
        f.require_group("splits").create_dataset("old-a", data=planted.split)
        f["splits"].create_dataset("old-b", data=other)
    result = audit(planted.path)
    assert list(result.splits) == ["old-a", "old-b"]
    crossing_b = {k for k in range(1, result.clusters + 1) if len(set(other[result.cluster == k].tolist())) == 2}
    assert len(result.crossing("old-a")) == 1 and set(result.crossing("old-b")) == crossing_b


def test_audit_through_the_cli(planted: Planted, cli):
    code, out, err = cli("audit", "--features", planted.path, "--threshold", "0.99")
    folder = planted.path.with_name("planted-audit")
    assert code == 0, err
    assert "1 exact and 2 near-duplicate pairs (cosine >= 0.99, fake), 3 clusters, 1 with a label conflict" in out
    assert f"split {SplitSpec().name}: 1 clusters on both the test and the study side" in out
    assert "precision 0.500, recall 0.017" in out
    assert {p.name for p in folder.iterdir()} == {"pairs.csv", "clusters.csv", "summary.md"}


@pytest.mark.parametrize("threshold", ["0", "1.5", "nan"])
def test_a_threshold_outside_0_1_is_one_line_and_exit_status_2(planted: Planted, cli, capsys, threshold):
    with pytest.raises(SystemExit) as info:  # argparse's own refusal, before any work
        cli("audit", "--features", planted.path, "--threshold", threshold)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "--threshold" in err
    assert not planted.path.with_name("planted-audit").exists()


def test_an_unknown_backbone_is_one_line_and_exit_status_2(planted: Planted, cli):
    code, out, err = cli("audit", "--features", planted.path, "--backbone", "nope")
    assert (code, out) == (2, "")
    assert err.strip().splitlines() == [
        f"error: {planted.path}: no embeddings for backbone 'nope' (the store has: {BACKBONE})"
    ]


def test_several_backbones_need_one_named(tmp_path: Path, cli):
    store = FeatureStore(synthetic_store(tmp_path / "s.h5", n=40))
    x, attrs = store.embeddings(BACKBONE), store.backbone_attrs(BACKBONE)
    write_arrays(tmp_path / "two.h5", store.samples(), {"a": (x, attrs), "b": (x, {**attrs, "fingerprint": "b"})})
    code, _, err = cli("audit", "--features", tmp_path / "two.h5")
    assert code == 2 and err.strip().splitlines() == [
        f"error: {tmp_path / 'two.h5'} holds several backbones (a, b): name one with --backbone"
    ]
    code, _, err = cli("audit", "--features", tmp_path / "two.h5", "--backbone", "b", "--out", tmp_path / "o")
    assert code == 0, err


def test_fit_group_duplicates_keeps_a_planted_copy_on_the_side_of_its_original(tmp_path, cli):
    """A test image's embedding planted on a study row of another lesion (a re-filed copy): the plain
    split leaves the pair straddling it; `fit --group-duplicates` merges the two lesions first, so both
    land on one side, and the split's name says so."""
    from classify.runs import load_run, read_run_split

    path = synthetic_store(tmp_path / "s.h5", n=240)
    store = FeatureStore(path)
    split = split_for(store, SplitSpec(folds=3))
    ids, groups = store.column("image_id"), store.column("group")
    original = int(np.flatnonzero(split == TEST)[0])
    copy = int(next(r for r in np.flatnonzero(split >= 0) if groups[r] != groups[original]))
    with h5py.File(path, "r+") as f:
        data = f["embeddings/fake/data"]
        data[copy] = data[original]
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    for run, extra in ((plain, ()), (merged, ("--group-duplicates", "0.999"))):
        quick = ("--folds", "3", "--trials", "1", *extra)
        code, _, err = cli("fit", "--features", path, "--head", "linear", "--out", run, *quick)
        assert code == 0, err
    side = {run: dict(zip(read_run_split(run).image_id, read_run_split(run).fold)) for run in (plain, merged)}
    assert (side[plain][ids[original]] == TEST) != (side[plain][ids[copy]] == TEST)  # the leak
    assert (side[merged][ids[original]] == TEST) == (side[merged][ids[copy]] == TEST)
    assert load_run(merged).card["split"] == "grouped-test20-k3-seed0-dup0.999-fake"
