"""The embedding map (classify/embedding_map.py): a faithful, reproducible layout of a store's rows, the
colourings that say what each point is, and the two pictures (PNG, inline SVG with the id on hover)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_store
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from classify.embedding_map import (
    EmbeddingMap,
    MapError,
    caption,
    colouring,
    compute_map,
    map_svg,
    stratified_sample,
    write_map_png,
)
from classify.runs import read_run_split
from features.splits import TEST, UNUSED, SplitSpec, split_for
from features.store import FeatureStore, Samples, StoreError, write_blocks

SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes apart in the embeddings (a 5-nearest-neighbour classifier is right on all of them)."""
    return synthetic_store(tmp_path_factory.mktemp("map") / "syn.h5", n=200, separation=5.0)


@pytest.fixture(scope="module")
def emap(store: Path) -> EmbeddingMap:
    return compute_map(store, seed=0)


def test_the_map_is_finite_and_the_same_for_a_seed(store, emap):
    assert emap.xy.shape == (200, 2) and np.isfinite(emap.xy).all()
    assert emap.total == 200 and not emap.sampled and emap.method == "t-SNE" and emap.backbone == "fake"
    assert list(emap.image_id) == [f"img{i:04d}" for i in range(200)]
    again = compute_map(store, seed=0)
    np.testing.assert_array_equal(again.xy, emap.xy)


def test_classes_separated_in_the_embeddings_stay_separated_on_the_map(store, emap):
    labels = colouring(store, emap, "label").category
    accuracy = cross_val_score(KNeighborsClassifier(5), emap.xy, labels, cv=5).mean()
    assert accuracy > 0.9


def test_a_large_store_is_mapped_through_a_sample_that_keeps_the_class_shares(tmp_path):
    path = synthetic_store(tmp_path / "uneven.h5", n=200, classes=("mel", "nv", "nv", "nv"), per_group=1)
    emap = compute_map(path, max_points=60, seed=3)
    assert len(emap) == 60 and emap.total == 200 and emap.sampled
    assert np.all(np.diff(emap.rows) > 0) and np.isfinite(emap.xy).all()
    shares = Counter(colouring(path, emap, "label").category.tolist())
    assert shares == {"mel": 15, "nv": 45}
    assert "60 of 200 images" in caption(emap, colouring(path, emap, "label"))
    np.testing.assert_array_equal(compute_map(path, max_points=60, seed=3).rows, emap.rows)


def test_a_stratified_sample_keeps_each_share_to_one_row():
    strata = np.array(["a"] * 700 + ["b"] * 250 + ["c"] * 45 + ["d"] * 5)
    for k, seed in ((100, 0), (333, 1), (999, 2)):
        picked = stratified_sample(strata, k, seed)
        assert len(picked) == k and len(set(picked.tolist())) == k and np.all(np.diff(picked) > 0)
        got = Counter(strata[picked].tolist())
        for stratum, size in Counter(strata.tolist()).items():
            assert abs(got[stratum] - k * size / len(strata)) <= 1
    np.testing.assert_array_equal(stratified_sample(strata, 100, 0), stratified_sample(strata, 100, 0))
    assert not np.array_equal(stratified_sample(strata, 100, 0), stratified_sample(strata, 100, 1))


def test_only_rows_the_backbone_embedded_are_mapped_and_several_backbones_need_a_name(tmp_path):
    n, rng = 80, np.random.default_rng(0)
    ids = [f"img{i:04d}" for i in range(n)]
    samples = Samples(ids, [f"{i}.jpg" for i in ids], ["mel", "nv"] * (n // 2), ids, [""] * n, {})
    attrs = {name: {"fingerprint": name, "identity": "{}", "dim": 8} for name in ("a", "b")}
    x = rng.normal(size=(n, 8)).astype(np.float32)
    path = tmp_path / "two.h5"
    write_blocks(path, samples, attrs, [(0, {"a": x[:60], "b": x[:60]}), (60, {"a": x[60:]})])
    with pytest.raises(StoreError, match="several backbones \\(a, b\\)"):
        compute_map(path)
    assert compute_map(path, backbone="a").total == n
    partial = compute_map(path, backbone="b")
    assert partial.total == 60 and set(partial.image_id) == set(ids[:60])


def test_colour_by_split_is_the_default_split_that_fit_makes(store, emap):
    sides = colouring(store, emap, "split").category
    split = split_for(FeatureStore(store), SplitSpec())
    expected = np.where(split == TEST, "test", np.where(split == UNUSED, "unused", "study"))
    np.testing.assert_array_equal(sides, expected)
    assert {"study", "test"} <= set(sides.tolist())


def test_colour_by_split_of_a_run_is_the_split_that_run_recorded(store, emap, cli, tmp_path):
    run = tmp_path / "run"
    code, _, err = cli("fit", "--features", store, "--head", "linear", "--out", run, "--seed", "1", "--folds", "3")
    assert code == 0, err
    recorded = read_run_split(run)
    fold = dict(zip(recorded.image_id.tolist(), recorded.fold.tolist()))
    sides = colouring(store, emap, "split", run=run).category
    for image_id, side in zip(emap.image_id.tolist(), sides.tolist()):
        expected = "unused" if image_id not in fold else "test" if fold[image_id] == TEST else "study"
        assert side == expected
    assert not np.array_equal(sides, colouring(store, emap, "split").category)  # not the default split


def test_colour_by_a_metadata_column(store, emap):
    site = colouring(store, emap, "site")
    np.testing.assert_array_equal(site.category, np.array(["back", "face"] * 100))
    assert site.order == ("back", "face") and site.counts() == {"back": 100, "face": 100}
    age = colouring(store, emap, "age")
    blank = np.array([i % 7 == 0 for i in range(200)])
    assert set(age.category[blank]) == {"missing"} and "missing" not in age.category[~blank]
    assert age.ordinal and age.order[-1] == "missing" and age.order[0] == "<30"


def test_an_unknown_colouring_names_what_there_is(store, emap):
    with pytest.raises(MapError) as caught:
        colouring(store, emap, "fitzpatrick")
    message = str(caught.value)
    assert "\n" not in message and "fitzpatrick" in message
    assert all(name in message for name in ("label", "split", "age", "site"))


def test_the_svg_is_self_contained_and_names_each_point_on_hover(store, emap):
    colours = colouring(store, emap, "label")
    text = map_svg(emap, colours)
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg" and len(root.get("viewBox").split()) == 4
    points = [c for c in root.iter(f"{SVG}circle") if c.find(f"{SVG}title") is not None]
    assert len(points) == len(emap)
    named = {c.find(f"{SVG}title").text.split(":")[0]: c.find(f"{SVG}title").text for c in points}
    assert set(named) == set(emap.image_id.tolist())
    label = dict(zip(emap.image_id.tolist(), colours.category.tolist()))
    assert all(title == f"{i}: {label[i]}" for i, title in named.items())
    assert "href" not in text and "<script" not in text and "url(" not in text
    assert all(len(c.get("cx").split(".")[-1]) <= 1 for c in points)
    legend = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "mel (100)" in legend and "nv (100)" in legend and caption(emap, colours) in legend


def test_the_png_is_written_with_its_legend(store, emap, tmp_path):
    import matplotlib.image

    path = write_map_png(emap, colouring(store, emap, "age"), tmp_path / "plots" / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    picture = matplotlib.image.imread(path)
    assert picture.shape[0] > 400 and picture.shape[1] > 600 and picture[..., :3].std() > 0.05


def test_a_map_of_test_time_views_uses_their_mean(tmp_path):
    path = synthetic_store(tmp_path / "views.h5", n=60, views=4)
    emap = compute_map(path)
    assert emap.xy.shape == (60, 2) and np.isfinite(emap.xy).all()


def test_the_map_command_writes_the_png_and_refuses_an_unknown_colour_in_one_line(store, tmp_path, cli):
    out = tmp_path / "map.png"
    code, printed, err = cli("map", "--features", store, "--color", "site", "--max-points", "100", "--out", out)
    assert code == 0, err
    assert "coloured by site; 100 of 200 images" in printed and str(out) in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = cli("map", "--features", store, "--color", "shoe_size", "--out", tmp_path / "no.png")
    assert code == 2 and "shoe_size" in err and "site" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no.png").exists()
