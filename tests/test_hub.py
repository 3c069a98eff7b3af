"""timm: and open_clip: backbones (extract/hub.py): pooling, input size, preprocessing from the weights'
config, the CLIP projection, weights offline and from files, licences, `backbones --search`, predict.

All offline: random init (`--weights none`), files saved from random-init models, or a Hugging Face
cache written by the test; small inputs where the model allows."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY
from imagefiles import lesion, lesion_set
from PIL import Image

from extract.backbones import (
    BackboneError,
    BackboneOptions,
    WeightsUnavailable,
    backbone_spec,
    get_family,
    load_backbone,
)
from extract.hub import TimmEmbedding, TimmFamily, parameter_blocks
from extract.preprocess import Preprocess
from features.store import FeatureStore, license_caveat, stored_name

DINO = "timm:vit_small_patch14_dinov2.lvd142m"
DINO_REPO = "timm/vit_small_patch14_dinov2.lvd142m"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CPU = ("--precision", "fp32", "--workers", "0", "--runtime", "torch", "--compile", "off", "--device", "cpu")


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    return lesion_set(tmp_path_factory.mktemp("few"), 2)


def _extract(cli, data: Path, out: Path, *args) -> tuple[int, str, str]:
    return cli("extract", "--data", data, "--out", out, *CPU, *args)


# ------------------------------------------------------------------------------------------- timm


def test_dinov2_embeds_its_pooled_tokens_and_records_its_preprocessing(tmp_path, few, cli):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    common = ("--backbone", DINO, "--weights", "none", "--input-size", "224")
    code, out, err = _extract(cli, few, a, *common)
    assert code == 0, err
    code, _, err = _extract(cli, few, b, *common, "--pool", "token+avg")
    assert code == 0, err
    store, both = FeatureStore(a), FeatureStore(b)
    attrs, both_attrs = store.backbone_attrs(DINO), both.backbone_attrs(DINO)
    assert store.embeddings(DINO).shape == (4, 384) and both.embeddings(DINO).shape == (4, 768)
    assert attrs["fingerprint"] != both_attrs["fingerprint"]
    assert attrs["interpolation"] == "bicubic" and attrs["input_size"] == 224 and attrs["resize"] == 224
    assert (list(attrs["mean"]), list(attrs["std"])) == IMAGENET
    assert attrs["crop_pct"] == 1.0 and attrs["crop_mode"] == "center"
    assert attrs["license"] == "apache-2.0" and attrs["pool"] == "auto" and both_attrs["pool"] == "token+avg"
    identity = json.loads(attrs["identity"])
    assert identity["input_size"] == 224 and identity["pool"] == "auto"
    assert "WARNING" not in out and "pool auto" in out  # an open licence: no warning


def test_token_pooling_is_the_class_token_and_the_mean_patch_token():
    auto = load_backbone(DINO, "none", BackboneOptions(input_size=56))
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        tokens = auto.module.model.forward_features(x)
        assert torch.allclose(auto.module(x), tokens[:, 0], atol=1e-5)  # DINOv2's own pooling: the class token
        for pool, expected in [
            ("token", tokens[:, 0]),
            ("avg", tokens[:, 1:].mean(dim=1)),
            ("token+avg", torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)),
        ]:
            assert torch.allclose(TimmEmbedding(auto.module.model, pool)(x), expected, atol=1e-5)
    assert auto.dim == 384
    assert backbone_spec(DINO, "none", BackboneOptions(input_size=56, pool="token+avg")).dim == 768


def test_convnext_gives_its_width_and_refuses_token_pooling(tmp_path, few, cli):
    code, _, err = _extract(cli, few, tmp_path / "c.h5", "--backbone", "timm:convnext_tiny", "--weights", "none")
    assert code == 0, err
    store = FeatureStore(tmp_path / "c.h5")
    assert store.embeddings("timm:convnext_tiny").shape == (4, 768)
    attrs = store.backbone_attrs("timm:convnext_tiny")
    assert attrs["input_size"] == 224 and attrs["resize"] == 235 and attrs["crop_pct"] == 0.95  # floor(224 / .95)
    started = time.monotonic()
    code, _, err = _extract(
        cli, few, tmp_path / "t.h5", "--backbone", "timm:convnext_tiny", "--weights", "none", "--pool", "token"
    )
    assert code == 2 and "no tokens to pool" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - started < 20 and not (tmp_path / "t.h5").exists()


def test_options_that_do_not_apply_are_refused_in_one_line(tmp_path, few, cli):
    for args, says in [
        (("--backbone", TINY, "--pool", "avg"), "--pool avg"),
        (("--backbone", TINY, "--input-size", "64"), "--input-size 64"),
        (("--backbone", "timm:convnext_tiny", "--clip-embed", "post"), "open_clip"),
        (("--backbone", "timm:not_a_model_at_all"), "unknown timm model"),
        (("--backbone", "timm:convnext_tiny.no_such_tag"), "fb_in22k"),
    ]:
        code, _, err = _extract(cli, few, tmp_path / "x.h5", "--weights", "none", *args)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exited:  # argparse's own one line
        _extract(cli, few, tmp_path / "x.h5", "--backbone", DINO, "--input-size", "8")
    assert exited.value.code == 2
    # an input size equal to a backbone's own is no change (predict passes it back from any store)
    same = backbone_spec(TINY, "none", BackboneOptions(input_size=224))
    assert same.identity() == backbone_spec(TINY, "none").identity()


def test_a_fixed_size_model_is_built_at_the_input_size_and_others_are_not():
    assert backbone_spec(DINO, "none", BackboneOptions(input_size=56)).preprocess.crop == 56
    assert TimmFamily("vit_small_patch14_dinov2.lvd142m", BackboneOptions(input_size=56))._size_kwargs() == {
        "img_size": 56
    }
    assert TimmFamily("convnext_tiny", BackboneOptions(input_size=96))._size_kwargs() == {}
    spec = backbone_spec(DINO, "none")
    assert spec.preprocess.crop == 518 and dict(spec.settings)["input_size"] == 518


@pytest.mark.parametrize("mode,crop_pct", [("center", 0.875), ("squash", 0.9), ("border", 0.95)])
def test_crop_modes_are_timms_own(mode, crop_pct):
    from timm.data import create_transform

    crop = 32
    ours = Preprocess(
        resize=int(crop / crop_pct), crop=crop, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), interpolation="bicubic"
    )
    ours = Preprocess(**{**ours.__dict__, "crop_pct": crop_pct, "crop_mode": mode})
    theirs = create_transform(
        (3, crop, crop),
        interpolation="bicubic",
        crop_pct=crop_pct,
        crop_mode=mode,
        mean=ours.mean,
        std=ours.std,
        use_prefetcher=True,  # uint8 out, as our to_uint8
    )
    for shape in ((60, 90), (90, 60)):
        picture = Image.fromarray(lesion(3, size=shape))
        assert torch.equal(ours.to_uint8(picture), torch.as_tensor(np.asarray(theirs(picture))))


def test_torchvision_recipes_keep_their_recorded_form():
    assert set(get_family("resnet50").preprocess.as_dict()) == {"resize", "crop", "mean", "std", "interpolation"}
    assert backbone_spec("resnet50", "none").settings == () and backbone_spec("resnet50", "none").license == ""


def test_blocks_follow_timms_grouping_and_hold_every_parameter_once():
    backbone = load_backbone(DINO, "none", BackboneOptions(input_size=56))
    blocks = get_family(DINO).blocks(backbone.module)
    assert len(blocks) == 13  # the stem (patch embedding, class token, position embeddings), 12 blocks
    seen: list[int] = []
    for block in blocks:
        seen += [id(p) for m in block for p in m.parameters()]
    assert sorted(seen) == sorted(id(p) for p in backbone.module.parameters())  # each exactly once
    assert {n for n, _ in blocks[0][-1].named_parameters()} == {"model__cls_token", "model__pos_embed"}
    assert backbone.module.model.blocks[11] in blocks[-1] and backbone.module.model.norm in blocks[-1]
    # what `finetune --unfreeze 2` trains: the last two blocks
    from classify.finetune.model import trainable_blocks

    _, trainable = trainable_blocks(backbone, "2")
    assert [list(b) for b in trainable] == [list(b) for b in blocks[-2:]]
    convnext = load_backbone("timm:convnext_atto", "none", BackboneOptions(input_size=64))
    assert len(get_family("timm:convnext_atto").blocks(convnext.module)) == 6  # stem, 4 stages, head norm
    with pytest.raises(KeyError):
        parameter_blocks(torch.nn.Linear(2, 2), [["weight"]])  # a parameter outside every group


# --------------------------------------------------------------------------------------- weights


def _hf_cache(home: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding `files` of `repo`'s main revision, laid out as huggingface_hub does."""
    folder = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / commit / name).write_bytes(data)
    return folder / "snapshots" / commit


def _safetensors(model: torch.nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_cached_default_weights_load_offline_and_resample_to_the_input_size(tmp_path, monkeypatch):
    torch.manual_seed(3)
    published = TimmFamily("vit_small_patch14_dinov2.lvd142m", BackboneOptions(input_size=70)).architecture()
    weights = _safetensors(published, tmp_path / "w.safetensors").read_bytes()
    config = {
        "architecture": "vit_small_patch14_dinov2",
        "num_classes": 0,
        "pretrained_cfg": {**TimmFamily("vit_small_patch14_dinov2.lvd142m").pretrained_cfg, "license": "cc-by-nc-4.0"},
    }
    _hf_cache(tmp_path / "hf", DINO_REPO, {"model.safetensors": weights, "config.json": json.dumps(config).encode()})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    backbone = load_backbone(DINO, "default", BackboneOptions(input_size=56))
    assert backbone.weights == DINO_REPO and backbone.source == "default"
    assert backbone.module.model.pos_embed.shape[1] == 1 + 4 * 4  # 70 px (5 x 5) resampled to 56 px (4 x 4)
    assert torch.equal(backbone.module.model.blocks[3].mlp.fc1.weight, published.blocks[3].mlp.fc1.weight)
    assert get_family(DINO).weights_present()
    # the same repository named by its hub id: architecture, config and licence from its config.json
    hub = load_backbone(f"timm:hf-hub:{DINO_REPO}", "default", BackboneOptions(input_size=56))
    assert hub.license == "cc-by-nc-4.0" and hub.weights == DINO_REPO
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        assert torch.allclose(hub.module(x), backbone.module(x), atol=1e-5)
    assert "commercial" in license_caveat(hub.license)


def test_offline_default_weights_fail_at_once_naming_repository_cache_and_command(tmp_path, monkeypatch, few, cli):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for offline in ("1", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable at once
        started = time.monotonic()
        code, _, err = _extract(cli, few, tmp_path / "d.h5", "--backbone", DINO, "--weights", "default")
        assert code == 2 and time.monotonic() - started < 30, err
        assert DINO_REPO in err and str(tmp_path / "hf" / "hub") in err and f"hf download {DINO_REPO}" in err
        assert "Traceback" not in err and not (tmp_path / "d.h5").exists()


def test_offline_default_weights_in_a_fresh_process(tmp_path, few):
    """As the issue checks it: a new process, an empty cache, HF_HUB_OFFLINE unset, no network."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "extract", "--data", str(few), "--out", str(tmp_path / "s.h5")]
        + ["--backbone", DINO, "--weights", "default", *CPU],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr
    assert DINO_REPO in done.stderr


def test_weights_files_load_as_safetensors_or_state_dicts(tmp_path):
    torch.manual_seed(5)
    family = get_family("timm:convnext_atto", BackboneOptions(input_size=64))
    model = family.architecture()
    full = _safetensors(model, tmp_path / "convnext.safetensors")
    loaded = load_backbone("timm:convnext_atto", str(full), BackboneOptions(input_size=64))
    assert loaded.source == "file" and torch.equal(loaded.module.model.stem[0].weight, model.stem[0].weight)
    # our own module's state dict (a fine-tuned backbone.pt), as a torch file
    torch.save(loaded.module.state_dict(), tmp_path / "backbone.pt")
    again = load_backbone("timm:convnext_atto", str(tmp_path / "backbone.pt"), BackboneOptions(input_size=64))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(again.module(x), loaded.module(x))
    wrong = _safetensors(torch.nn.Linear(3, 3), tmp_path / "wrong.safetensors")
    with pytest.raises(BackboneError, match="not a state dict of timm:convnext_atto"):
        load_backbone("timm:convnext_atto", str(wrong))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackboneError, match="not a loadable safetensors file"):
        load_backbone("timm:convnext_atto", str(tmp_path / "bad.safetensors"))


def test_fit_and_predict_reproduce_a_run_on_a_timm_store(tmp_path, cli):
    manifest = lesion_set(tmp_path / "data", 12)
    torch.manual_seed(11)
    weights = _safetensors(get_family("timm:convnext_tiny").architecture(), tmp_path / "convnext.safetensors")
    store, run = tmp_path / "s.h5", tmp_path / "run"
    code, _, err = _extract(
        cli, manifest, store, "--backbone", "timm:convnext_tiny", "--weights", weights, "--input-size", "64"
    )
    assert code == 0, err
    code, _, err = cli(
        "fit",
        "--features",
        store,
        "--head",
        "linear",
        "--out",
        run,
        "--folds",
        "2",
        "--trials",
        "2",
        "--test-fraction",
        "0.34",
        "--allow-small-test",
    )
    assert code == 0, err
    recorded = json.loads((run / "run.json").read_text())["extraction"]["timm:convnext_tiny"]
    assert (recorded["input_size"], recorded["pool"], recorded["clip_embed"]) == (64, "auto", None)
    expected = {row["image"]: row for row in csv.DictReader(open(run / "test_predictions.csv"))}
    folder = tmp_path / "new"
    folder.mkdir()
    for image_id in expected:
        shutil.copy(tmp_path / "data" / "img" / f"{image_id}.png", folder / f"{image_id}.png")
    out = tmp_path / "preds.csv"
    code, _, err = cli("predict", "--run", run, "--images", folder, "--out", out, "--workers", "0")
    assert code == 0, err  # (a fingerprint that differed, e.g. another input size, would be refused)
    got = {row["image"]: row for row in csv.DictReader(open(out))}
    assert sorted(got) == sorted(expected)
    for image_id, row in got.items():
        assert abs(float(row["mel"]) - float(expected[image_id]["mel"])) < 1e-5


def test_a_vit_beside_a_cnn_with_views_and_on_openvino_at_any_batch_size(tmp_path, few, cli):
    """Hub and torchvision backbones in one pass with test-time views; the ViT on the OpenVINO runtime
    gives torch's embeddings, also when its cached model is read back at another batch size (a ViT's
    class token is broadcast to the batch: a model converted for one batch size only would bake it in),
    and in bf16 on either runtime the same to bf16's rounding."""
    vit = "timm:vit_tiny_patch16_224"
    torch.manual_seed(7)
    options = BackboneOptions(input_size=32)
    weights = _safetensors(get_family(vit, options).architecture(), tmp_path / "vit.safetensors")
    both = tmp_path / "both.h5"
    pair = ("--backbone", f"{vit},{TINY}", "--weights", f"{weights},none", "--tta", "flip", "--batch-size", "4")
    code, _, err = _extract(cli, few, both, *pair, "--input-size", "32")  # one size for both: not regnet's
    assert code == 2 and "regnet_x_400mf" in err and "comma-separated" in err and "Traceback" not in err
    code, _, err = _extract(cli, few, both, *pair, "--input-size", "32,0")  # one each: 0, the weights' own
    assert code == 0, err
    store = FeatureStore(both)
    assert store.done(vit).all() and store.done(TINY).all()
    assert store.backbone_attrs(vit)["input_size"] == 32 and store.backbone_attrs(TINY)["input_size"] == 224
    expected = store.embeddings(vit, views=True)
    assert expected.shape == (4, 2, 192)  # two views each
    vit_alone = (
        "--backbone",
        vit,
        "--weights",
        weights,
        "--input-size",
        "32",
        "--tta",
        "flip",
        "--runtime",
        "openvino",
    )
    for batch in (4, 3):  # the second reads the model the first converted, and reshapes it
        out = tmp_path / f"ov{batch}.h5"
        code, _, err = _extract(cli, few, out, *vit_alone, "--batch-size", str(batch))
        assert code == 0, err
        np.testing.assert_allclose(FeatureStore(out).embeddings(vit, views=True), expected, rtol=1e-3, atol=1e-4)
    for runtime in ("torch", "openvino"):  # bf16: the same features to bf16's rounding
        out = tmp_path / f"bf16-{runtime}.h5"
        code, _, err = _extract(cli, few, out, *vit_alone, "--runtime", runtime, "--precision", "bf16")
        assert code == 0, err
        got = FeatureStore(out).embeddings(vit, views=True)
        assert FeatureStore(out).backbone_attrs(vit)["precision"] == "bf16"
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.05


def test_finetune_a_vit_from_a_run_takes_the_runs_pooling_and_size(tmp_path, cli):
    """finetune --init on a ViT store made with --pool token+avg --input-size 32: the backbone is built
    as the store's was (else the head would meet other features), the top two blocks train (at --lr-decay),
    the run's own store and predict follow those options; a differing --pool is refused."""
    vit = "timm:vit_tiny_patch16_224"
    manifest = lesion_set(tmp_path / "data", 12)
    torch.manual_seed(5)
    options = BackboneOptions(pool="token+avg", input_size=32)
    weights = _safetensors(get_family(vit, options).architecture(), tmp_path / "vit.safetensors")
    store, fitted, tuned = tmp_path / "s.h5", tmp_path / "fitted", tmp_path / "tuned"
    made = ("--pool", "token+avg", "--input-size", "32")
    code, _, err = _extract(cli, manifest, store, "--backbone", vit, "--weights", weights, *made)
    assert code == 0, err
    split = ("--test-fraction", "0.34", "--allow-small-test")
    code, _, err = cli(
        "fit", "--features", store, "--head", "linear", "--out", fitted, "--folds", "2", "--trials", "1", *split
    )
    assert code == 0, err
    common = ("finetune", "--data", manifest, "--backbone", vit, "--init", fitted)
    cheap = ("--epochs", "1", "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--tta", "none")
    code, _, err = cli(*common, "--out", tmp_path / "other", "--pool", "avg", *cheap, *split)
    assert code != 0 and "--pool avg" in err and "token+avg" in err and "Traceback" not in err
    code, _, err = cli(*common, "--out", tuned, "--unfreeze", "2", "--lr-decay", "0.5", *cheap, *split)
    assert code == 0, err
    card = json.loads((tuned / "run.json").read_text())
    recorded = card["extraction"][vit]
    assert (recorded["pool"], recorded["input_size"]) == ("token+avg", 32)
    assert FeatureStore(tuned / "embeddings.h5").embeddings(vit).shape[1] == 2 * 192
    trained = torch.load(tuned / "checkpoint.pt", weights_only=True)["model"]  # the first stage's last epoch
    start = load_backbone(vit, str(weights), options).module.state_dict()
    changed = {k.split(".")[2] for k in start if not torch.equal(start[k], trained["backbone." + k])}
    assert {"10", "11"} <= changed <= {"10", "11", "weight", "bias"}, changed  # the top two blocks, final norm
    expected = {row["image"]: row for row in csv.DictReader(open(tuned / "test_predictions.csv"))}
    folder = tmp_path / "new"
    folder.mkdir()
    for image_id in expected:
        shutil.copy(tmp_path / "data" / "img" / f"{image_id}.png", folder / f"{image_id}.png")
    out = tmp_path / "preds.csv"
    code, _, err = cli("predict", "--run", tuned, "--images", folder, "--out", out, "--workers", "0")
    assert code == 0, err
    got = {row["image"]: row for row in csv.DictReader(open(out))}
    assert sorted(got) == sorted(expected)
    for image_id, row in got.items():
        assert abs(float(row["mel"]) - float(expected[image_id]["mel"])) < 1e-5


# -------------------------------------------------------------------------------------------- OpenCLIP


def test_open_clip_tower_before_and_after_its_projection(tmp_path, few, cli):
    name = "open_clip:ViT-B-32/openai"
    code, out, err = _extract(cli, few, tmp_path / "pre.h5", "--backbone", name, "--weights", "none")
    assert code == 0, err
    code, _, err = _extract(
        cli, few, tmp_path / "post.h5", "--backbone", name, "--weights", "none", "--clip-embed", "post"
    )
    assert code == 0, err
    pre, post = FeatureStore(tmp_path / "pre.h5"), FeatureStore(tmp_path / "post.h5")
    assert pre.backbones == [stored_name(name)] == ["open_clip:ViT-B-32%2Fopenai"]  # HDF5 reads "/" as a group
    np.testing.assert_array_equal(pre.embeddings(name), pre.embeddings(stored_name(name)))  # either spelling
    name = stored_name(name)
    assert pre.embeddings(name).shape == (4, 768) and post.embeddings(name).shape == (4, 512)
    attrs = pre.backbone_attrs(name)
    assert attrs["clip_embed"] == "pre" and post.backbone_attrs(name)["clip_embed"] == "post"
    assert attrs["fingerprint"] != post.backbone_attrs(name)["fingerprint"]
    assert attrs["interpolation"] == "bicubic" and attrs["input_size"] == 224 and attrs["mean"][0] == 0.48145466
    assert attrs["license"] == "unknown"  # no model card cached
    assert f"WARNING: {name} weights: their licence is unknown" in out
    assert get_family(name).default_weights == "timm/vit_base_patch32_clip_224.openai"  # either spelling


def test_open_clip_loads_a_whole_clip_checkpoint_or_its_tower(tmp_path):
    import open_clip

    torch.manual_seed(2)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, load_weights=False)
    path = _safetensors(clip, tmp_path / "clip.safetensors")
    pre = load_backbone("open_clip:ViT-B-32", str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(pre.module(x) @ clip.visual.proj, clip.visual(x), atol=1e-4)
    # at another input size its position embeddings are resized as OpenCLIP does
    post = load_backbone("open_clip:ViT-B-32", str(path), BackboneOptions(clip_embed="post", input_size=64))
    with torch.inference_mode():
        assert post.module(torch.randn(1, 3, 64, 64)).shape == (1, 512)
    with pytest.raises(BackboneError, match="--pool"):
        backbone_spec("open_clip:ViT-B-32", "none", BackboneOptions(pool="token"))
    with pytest.raises(WeightsUnavailable, match="names no pretrained weights"):
        backbone_spec("open_clip:ViT-B-32", "default")


# ------------------------------------------------------------------------------ listing and licences


def test_backbones_lists_the_families_and_searches_timm(cli):
    code, out, _ = cli("backbones")
    assert code == 0 and "timm:<name>" in out and "open_clip:<arch>/<pretrained>" in out and "resnet50" in out
    code, out, _ = cli("backbones", "--search", "dinov2")
    assert code == 0
    row = next(line.split() for line in out.splitlines() if line.startswith(f"{DINO} "))
    assert row[1:] == ["384", "518px", "apache-2.0", "no"]
    code, out, _ = cli("backbones", "--search", "no_model_is_called_this")
    assert code == 0 and "no pretrained" in out


def test_licences_that_need_a_look():
    assert license_caveat("apache-2.0") is None and license_caveat("MIT") is None
    assert "commercial" in license_caveat("cc-by-nc-4.0")
    assert "commercial" in license_caveat("fair-noncommercial-research-license")
    assert "unknown" in license_caveat("unknown") and "terms" in license_caveat("apple-ascl")
