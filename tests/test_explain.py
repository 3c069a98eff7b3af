"""Explanation heatmaps (classify/explain.py) on real dermoscopic images and real ImageNet weights
(EfficientNet-Lite0's, the only ones available offline): they depend on the trained weights and on
nothing random, they land on the lesion, they come back in the run's geometry, and runs whose heads
read more than one image's embedding are refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from classify.explain import (
    GRAD_CAM,
    ExplainError,
    Explanation,
    Occlusion,
    embed,
    explain,
    explain_picture,
    load_explainer,
    overlay,
    write_explanations,
)
from classify.runs import CARD, load_run
from conftest import SHARED_DATA
from extract.backbones import load_backbone
from extract.images import load_image
from features.store import FeatureStore

HAM = SHARED_DATA / "ham10000_mel_nv_150"
BACKBONE = "efficientnet_lite0"
PER_CLASS = 20
SKIN = (224, 172, 150)
COARSE = Occlusion(patch=56, stride=56)
"""A 4 x 4 grid of patches on the 224 px input: enough to tell a lesion from blank skin, and cheap."""

pytestmark = pytest.mark.skipif(not HAM.is_dir(), reason=f"real data folder {HAM} is not here")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for torch: batches of one image and 40-row fits gain nothing from a second,
    and on a shared machine a second thread that waits for a busy core slows every call many times."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def made(lite0_runs: Path) -> Path:
    """conftest's real Lite0 store of 40 HAM10000 images and its linear and kNN runs."""
    return lite0_runs


@pytest.fixture(scope="module")
def explainer(made: Path):
    return load_explainer(made / "linear", device="cpu")


def _picture(image_id: str) -> Image.Image:
    return load_image(HAM / "images" / f"{image_id}.jpg")[0]


def _ids(made: Path, label: str, n: int) -> list[str]:
    store = FeatureStore(made / "store.h5")
    return list(store.column("image_id")[store.column("label") == label][:n])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two maps; a constant map ranks nothing, so it shares no order (0)."""
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel())[0])


def test_grad_cam_depends_on_the_trained_weights_and_on_nothing_random(made, explainer):
    """Adebayo et al. 2018's randomisation check: the same head on a random-init backbone gives other
    maps; the trained backbone gives the same map every time."""
    randomised = dataclasses.replace(explainer, backbone=load_backbone(BACKBONE, "none"))
    alike = []
    for image_id in _ids(made, "mel", 2) + _ids(made, "nv", 2):
        picture = _picture(image_id)
        first, again = explain_picture(explainer, image_id, picture), explain_picture(explainer, image_id, picture)
        assert first.method == "Grad-CAM" and first.target == "mel"  # the run's positive class
        assert np.array_equal(first.heat, again.heat) and first.probability == again.probability
        assert first.heat.max() == 1.0 and first.heat.min() >= 0
        alike.append(_spearman(first.heat, explain_picture(randomised, image_id, picture).heat))
    assert np.mean(alike) < 0.5, alike


def test_the_explained_network_reproduces_the_runs_embeddings_and_probabilities(made, explainer):
    store = FeatureStore(made / "store.h5")
    run = load_run(made / "linear")
    ids = list(store.column("image_id"))
    for image_id in _ids(made, "mel", 1) + _ids(made, "nv", 1):
        picture = _picture(image_id)
        x = store.embeddings(BACKBONE)[ids.index(image_id)]
        with torch.inference_mode():
            again = embed(explainer, explainer.backbone.preprocess.to_uint8(picture)[None])[0].numpy()
        np.testing.assert_allclose(again, x, atol=1e-4)
        shown = explain_picture(explainer, image_id, picture)
        assert shown.probability == pytest.approx(run.proba(x[None])[0, run.classes.index("mel")], abs=1e-5)
        assert shown.image.shape == (224, 224, 3) and shown.image.dtype == np.uint8
        assert shown.heat.shape == (224, 224)


def test_grad_cam_turns_each_test_time_view_back(made, explainer):
    """With the eight views of the square averaged, a rotated picture has the same views, so its map is
    the rotated map: each view's map is returned to the picture's orientation before the average."""
    d8 = dataclasses.replace(explainer, views="d8")
    pixels = d8.backbone.preprocess.to_uint8(_picture(_ids(made, "mel", 1)[0]))
    mel = d8.run.classes.index("mel")
    heat = GRAD_CAM.heat(d8, pixels, mel)
    turned = GRAD_CAM.heat(d8, torch.rot90(pixels, 1, dims=(1, 2)), mel)
    np.testing.assert_allclose(turned, np.rot90(heat, 1), atol=1e-3)


def _pasted(made: Path, explainer) -> tuple[Image.Image, np.ndarray]:
    """The lesion the linear run is surest is a melanoma, cut out and pasted off-centre on blank skin;
    and where the cut-out lies in the model's input."""
    store = FeatureStore(made / "store.h5")
    run = load_run(made / "linear")
    mel = store.column("label") == "mel"
    p = run.proba(store.embeddings(BACKBONE))[:, run.classes.index("mel")]
    image_id = store.column("image_id")[np.argmax(np.where(mel, p, -1))]
    canvas = Image.new("RGB", (300, 300), SKIN)
    canvas.paste(_picture(image_id).crop((25, 25, 125, 125)), (30, 170))
    mask = Image.new("RGB", (300, 300))
    mask.paste((255, 255, 255), (30, 170, 130, 270))
    return canvas, explainer.backbone.preprocess.to_uint8(mask)[0].numpy() > 127


def _inside_over_outside(shown: Explanation, inside: np.ndarray) -> float:
    return float(shown.heat[inside].mean() / max(shown.heat[~inside].mean(), 1e-9))


def test_a_lesion_on_blank_skin_draws_grad_cam_onto_itself(made, explainer):
    canvas, inside = _pasted(made, explainer)
    assert 0.05 < inside.mean() < 0.25
    shown = explain_picture(explainer, "pasted", canvas)
    assert shown.method == "Grad-CAM"
    assert _inside_over_outside(shown, inside) > 2
    assert shown.heat[inside].sum() > 0.5 * shown.heat.sum()


def test_a_lesion_on_blank_skin_draws_occlusion_onto_itself(made, explainer):
    canvas, inside = _pasted(made, explainer)
    shown = explain_picture(load_explainer(made / "knn", device="cpu", occlusion=COARSE), "pasted", canvas)
    assert shown.method == "occlusion"
    assert _inside_over_outside(shown, inside) > 2


@pytest.mark.parametrize(("head", "method"), [("linear", "Grad-CAM"), ("knn", "occlusion")])
def test_write_explanations_writes_a_captioned_png_per_readable_image(made, tmp_path, head, method):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    images = [HAM / "images" / f"{i}.jpg" for i in _ids(made, "mel", 1) + _ids(made, "nv", 1)]
    occlusion = Occlusion(patch=112, stride=112)
    failed = {}
    explained = explain(made / head, [*images, broken], device="cpu", occlusion=occlusion, failed=failed)
    written = write_explanations(explained, tmp_path / "out")
    assert [p.name for p in written] == [f"{p.stem}.png" for p in images]
    assert list(failed) == ["broken"] and "not an image" in failed["broken"]
    for path in written:
        png = Image.open(path)
        assert png.size == (224, 224) and png.mode == "RGB"
        assert png.text["method"] == method and png.text["target"] == "mel"
        assert 0 <= float(png.text["probability"]) <= 1
    done = list(explain(made / head, [broken, images[0]], device="cpu", occlusion=occlusion))
    assert [(e.image_id, e.method) for e in done] == [(images[0].stem, method)]
    drawn = np.asarray(overlay(done[0]))
    assert (drawn[:12, :60] == 255).all(axis=-1).any(), "the caption is drawn on the picture"


@pytest.mark.parametrize("edit", ["backbones", "meta"])
def test_runs_whose_head_reads_more_than_one_image_embedding_are_refused(made, tmp_path, edit):
    """A run's card as `fit --backbone A,B` or `fit --meta age` writes it (the head files untouched:
    explaining refuses before it reads them)."""
    run = shutil.copytree(made / "linear", tmp_path / "run")
    card = json.loads((run / CARD).read_text())
    if edit == "backbones":
        card["inputs"]["backbones"].append("timm:resnet18")
        card["extraction"]["timm:resnet18"] = card["extraction"][BACKBONE]
    else:
        card["inputs"]["meta"] = ["age"]
        card["meta_encoder"] = {"age": {"kind": "number", "median": 50.0}}
    (run / CARD).write_text(json.dumps(card))
    with pytest.raises(ExplainError) as refused:
        load_explainer(run, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and ("fit --backbone NAME" in message if edit == "backbones" else "--meta" in message)


def test_a_method_the_head_cannot_take_is_refused(made):
    with pytest.raises(ExplainError, match="occlusion"):
        load_explainer(made / "knn", device="cpu", method="Grad-CAM")


def test_predict_explain_writes_an_overlay_per_image_naming_the_method(made, tmp_path, cli):
    """The command a user runs: `predict --explain DIR` with a linear run (Grad-CAM) and a kNN run
    (occlusion); a run that cannot be explained is refused before any image is embedded."""
    images = [str(HAM / "images" / f"{i}.jpg") for i in _ids(made, "mel", 2) + _ids(made, "nv", 1)]
    for head, method in (("linear", "Grad-CAM"), ("knn", "occlusion")):
        out = tmp_path / head
        code, printed, err = cli(
            "predict", "--run", made / head, "--images", *images, "--out", tmp_path / f"{head}.csv", "--explain", out
        )
        assert code == 0, err
        assert f"wrote 3 explanations to {out}" in printed
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(i).stem}.png" for i in images)
        assert {Image.open(p).text["method"] for p in out.iterdir()} == {method}
    run = shutil.copytree(made / "linear", tmp_path / "meta-run")
    card = json.loads((run / CARD).read_text())
    card["inputs"]["meta"] = ["age"]
    card["meta_encoder"] = {"age": {"kind": "number", "median": 50.0}}
    (run / CARD).write_text(json.dumps(card))
    code, _, err = cli("predict", "--run", run, "--images", *images, "--out", tmp_path / "no.csv", "--explain", "x")
    assert code == 2 and "--meta" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "no.csv").exists()
