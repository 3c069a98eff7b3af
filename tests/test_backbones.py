"""The backbone registry: dims, input sizes, frozen eval modules, weights files, offline failure,
EfficientNet-Lite0/1/2 with their real weights."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import TINY

from extract import digests
from extract.backbones import (
    REGISTRY,
    BackboneError,
    WeightsUnavailable,
    backbone_spec,
    build_backbone,
    get_family,
    load_backbone,
)
from extract.images import load_image
from extract.run import ExtractConfig, backbone_layouts

SEEDS = {"resnet50": (2048, 224), "vgg11": (4096, 224), "densenet121": (1024, 224), "inception_v3": (2048, 299)}
LITE = {"efficientnet_lite0": (1280, 224), "efficientnet_lite1": (1280, 240), "efficientnet_lite2": (1280, 260)}
"""EfficientNet-Lite variants with offline weights: (embedding size, input size)."""


@pytest.mark.parametrize("name", [*SEEDS, *LITE])
def test_random_init_backbone_gives_its_dimension_at_its_input_size(name):
    backbone = load_backbone(name, "none")
    dim, size = {**SEEDS, **LITE}[name]
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
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    for name, (_, crop) in LITE.items():
        lite = get_family(name).preprocess
        assert (lite.resize, lite.crop) == (crop + 32, crop)  # TF's eval recipe; Lite0's stores say 256 / 224
        x = lite.normalize(pixels)
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


GRACE_HOPPER_TOP5 = {
    "efficientnet_lite0": {"military uniform", "academic gown", "mortarboard"},
    "efficientnet_lite1": {"military uniform", "academic gown", "mortarboard"},
    "efficientnet_lite2": {"military uniform", "Windsor tie", "suit"},
}
"""Classes each Lite variant's ImageNet classifier must put among its top 5 for grace_hopper.jpg."""


@pytest.mark.parametrize("name", list(GRACE_HOPPER_TOP5))
def test_efficientnet_lite_real_weights_know_a_real_photo(name):
    """The offline ImageNet weights, our architecture and our preprocessing together: a photograph of
    Grace Hopper in uniform must come out as what ImageNet calls it."""
    import matplotlib.cbook as cbook

    family = get_family(name)
    if not family.weights_present():
        pytest.fail(f"{family.package} is a dependency and must be installed")
    assert family.default_file().name == family.filename  # what the recorded identity names
    backbone = load_backbone(name, "default")
    assert backbone.preprocess.crop == LITE[name][1]
    img, _ = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    x = backbone.preprocess.normalize(backbone.preprocess.to_uint8(img)[None])
    with torch.inference_mode():
        embedding = backbone.module(x)
    state = torch.load(family.default_file(), map_location="cpu", weights_only=True)
    logits = embedding @ state["_fc.weight"].T + state["_fc.bias"]
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    top5 = [categories[i] for i in logits.topk(5).indices[0]]
    assert GRACE_HOPPER_TOP5[name] <= set(top5), top5


# ------------------------------------------------------------------ identity without building the network

FINGERPRINTS = {
    ("resnet50", "none"): "6ea95a4f867f2f39",
    ("vgg11", "none"): "ca035676dd32bcfb",
    ("densenet121", "none"): "8229a94b5afb47be",
    ("inception_v3", "none"): "8998b41fe8936a91",
    ("efficientnet_lite0", "none"): "6bcf4f9586b969d7",
    ("efficientnet_lite0", "default"): "242a46f04c692075",
    ("efficientnet_lite1", "none"): "86b6d18c859f6bea",
    ("efficientnet_lite1", "default"): "808c64bb7d5a253c",
    ("efficientnet_lite2", "none"): "f709de70468e9362",
    ("efficientnet_lite2", "default"): "4d93cc29db7d88fb",
    (TINY, "none"): "fd0855ba0e28ff07",
}
"""Fingerprints (fp32, --tta none, --runtime torch, --decode pil) that stores written before backbones had specs
record, from a built backbone: a spec must give the same, or existing stores stop being extended (Lite1
and Lite2 came later: their entries pin what their stores have recorded since)."""


@pytest.mark.parametrize("name,weights", list(FINGERPRINTS))
def test_identity_without_building_is_the_built_backbones(name, weights, monkeypatch):
    assert set(REGISTRY) <= {n for n, _ in FINGERPRINTS}  # every registered backbone is here
    built = load_backbone(name, weights)
    if name in REGISTRY:  # (a torchvision:<name> outside the registry is built once to learn its size)

        def no_building(self):
            raise AssertionError(f"{self.name} was built")

        monkeypatch.setattr(type(get_family(name)), "architecture", no_building)
    spec = backbone_spec(name, weights)
    assert spec == built.spec and spec.dim == built.dim == built.module.embedding_dim
    cfg = ExtractConfig(backbone=name, weights=weights, precision="fp32", tta="none", runtime="torch", decode="pil")
    [layout] = backbone_layouts(cfg)
    assert layout.name == name and layout.dim == built.dim
    assert layout.attrs["fingerprint"] == FINGERPRINTS[name, weights]
    assert json.loads(layout.attrs["identity"]) == {
        **built.identity(),
        "precision": "fp32",
        "views": "none",
        "runtime": "torch",
    }


def test_a_weights_files_spec_is_its_content_and_a_changed_file_is_not_built(tmp_path):
    torch.manual_seed(7)
    path = tmp_path / "tiny.pth"
    torch.save(get_family(TINY).architecture().state_dict(), path)
    spec = backbone_spec(TINY, str(path))
    assert spec == load_backbone(TINY, str(path)).spec
    assert spec.source == "file" and spec.weights == str(path.resolve())
    assert spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert build_backbone(spec).spec == spec
    torch.save(get_family(TINY).architecture().state_dict(), path)  # other weights under the same name
    with pytest.raises(BackboneError, match="changed"):
        build_backbone(spec)
    with pytest.raises(BackboneError, match="does not exist"):
        backbone_spec(TINY, str(tmp_path / "absent.pth"))


def test_weights_digests_are_hashed_once_per_version_of_the_file(tmp_path, monkeypatch):
    hashed = []
    monkeypatch.setattr(digests, "file_sha256", lambda path: hashed.append(path) or hashlib.sha256(b"").hexdigest())
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    store = tmp_path / "cache" / digests.DIGESTS_NAME
    first = digests.DigestCache(store)
    assert first.sha256(weights) == hashlib.sha256(b"").hexdigest() and len(hashed) == 1
    assert first.sha256(weights) == first.sha256(str(weights)) and len(hashed) == 1  # remembered
    assert digests.DigestCache(store).sha256(weights) and len(hashed) == 1  # another process: from disk
    weights.write_bytes(b"other weights")  # another version of the file
    digests.DigestCache(store).sha256(weights)
    assert len(hashed) == 2
    store.write_text("{not json")  # a damaged memory is ignored (and replaced)
    digests.DigestCache(store).sha256(weights)
    assert len(hashed) == 3 and json.loads(store.read_text())["format"] == 1
    assert digests.DigestCache(None).sha256(weights) and len(hashed) == 4  # memory only


def test_backbone_specs_remember_digests_in_the_cache(tmp_path, compiled_cache):
    path = tmp_path / "tiny.pth"
    torch.save(get_family(TINY).architecture().state_dict(), path)
    spec = backbone_spec(TINY, str(path))
    remembered = json.loads((compiled_cache.parent / digests.DIGESTS_NAME).read_text())["files"]
    assert list(remembered.values()) == [spec.weights_sha256]
    assert digests.weights_sha256(path) == spec.weights_sha256


# ------------------------------------------------------------------ blocks for finetune --unfreeze N


@pytest.mark.parametrize("name", [*REGISTRY, TINY])
def test_blocks_are_modules_of_the_network_disjoint_and_in_forward_order(name):
    """`finetune --unfreeze N` trains the last N blocks: every block must be modules of the network
    with parameters, no parameter in two blocks, every parameter in one, and the blocks run in their
    order (TINY stands for the generic split of a torchvision:<name> backbone)."""
    backbone = load_backbone(name, "none")
    model = backbone.module
    blocks = get_family(name).blocks(model)
    assert len(blocks) >= 4
    modules = {id(m) for m in model.modules()}
    seen: set[int] = set()
    for block in blocks:
        assert block and all(id(m) in modules for m in block)
        params = {id(p) for m in block for p in m.parameters()}
        assert params and not params & seen
        seen |= params
    assert seen == {id(p) for p in model.parameters()}
    order: list[int] = []
    hooks = [
        m.register_forward_pre_hook(lambda module, args, k=k: order.append(k))
        for k, block in enumerate(blocks)
        for m in block
    ]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, backbone.preprocess.crop, backbone.preprocess.crop))
    finally:
        for hook in hooks:
            hook.remove()
    assert set(order) == set(range(len(blocks))) and order == sorted(order)
