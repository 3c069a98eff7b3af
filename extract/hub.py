"""Any timm or OpenCLIP model as a backbone: `timm:<name>` and `open_clip:<arch>/<pretrained>` (each
also as `hf-hub:ORG/REPO`), as `Family` entries of the registry in extract/backbones.py.

timm: the embedding is the model's pooled pre-logits (`forward_head(..., pre_logits=True)`) or, for a
transformer, its class token, its mean patch token or both side by side (`--pool`); the preprocessing
is the weights' own pretrained config (`timm.data.resolve_data_config`); `--input-size` builds the
model at another size (timm's `img_size=`, whose position embeddings are resampled when weights load).
OpenCLIP: the image tower, before or after its projection into the joint space (`--clip-embed`), with
OpenCLIP's own preprocessing.

Default weights are the very files timm and OpenCLIP download, in the same Hugging Face cache
($HF_HOME/hub): a cached file is used without touching the network (as torchvision's cache is), a
missing one is downloaded, unless HF_HUB_OFFLINE is set or the hub cannot be reached, which fails at
once with the repository, the cache folder and the command that fetches the file. Whatever the source,
a state dict is read without unpickling anything (`read_state`) and loaded strictly: every key of the
embedding network, nothing else.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import re
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from extract.backbones import (
    DEFAULT_OPTIONS,
    DOWNLOAD_TIMEOUT_S,
    OPEN_CLIP_PREFIX,
    TIMM_PREFIX,
    BackboneError,
    BackboneOptions,
    Family,
    WeightsUnavailable,
    state_keys,
)
from extract.preprocess import CROP_MODES, Preprocess

__all__ = [
    "HF_HUB_PREFIX",
    "OPEN_CLIP_WEIGHTS",
    "SEARCH_SIZES_UP_TO",
    "TIMM_WEIGHTS",
    "TOKEN_POOLS",
    "HubUnavailable",
    "OpenClipFamily",
    "SearchRow",
    "TimmEmbedding",
    "TimmFamily",
    "cached_hub_file",
    "card_license",
    "fetch_hub_file",
    "hf_cache",
    "parameter_blocks",
    "search",
]

log = logging.getLogger("extract")

HF_HUB_PREFIX = "hf-hub:"
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""The files of a timm repository on the hub, in timm's own order of preference."""
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""The files of an OpenCLIP repository, in OpenCLIP's own order of preference."""
CARD = "README.md"
"""The repository's model card, whose metadata names the licence."""

TOKEN_POOLS = {"token": ("token",), "avg": ("avg",), "token+avg": ("token", "avg")}
"""--pool values that pool a transformer's final tokens: which parts, side by side."""

SEARCH_SIZES_UP_TO = 12
"""`backbones --search` builds (on the meta device: no memory, no arithmetic) at most this many
architectures to show their embedding sizes, which no pretrained config records; a broader search shows
"?" rather than spend seconds building every match."""


class HubUnavailable(RuntimeError):
    """A file of the Hugging Face hub that is not cached and cannot be downloaded now (the reason)."""


# ------------------------------------------------------------------------------------ the hub's files


def hf_cache() -> Path:
    """The Hugging Face cache that timm and OpenCLIP download into, read from the environment now (as
    huggingface_hub reads it when it is imported): $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def cached_hub_file(repo: str, filename: str) -> Path | None:
    """The cached file of the repository's main revision, found without any network access."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=hf_cache())
    except Exception:  # a malformed repository id: nothing of it is cached
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _offline_reason() -> str | None:
    """Why the hub cannot be reached now, found within seconds; None if it may be. huggingface_hub
    itself retries a failed connection for about half a minute per file, which an offline machine
    should not wait for."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: only the download itself can tell
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "", port), timeout=DOWNLOAD_TIMEOUT_S).close()
    except OSError as exc:
        return f"{endpoint.hostname} cannot be reached: {exc}"
    return None


def fetch_hub_file(repo: str, filenames: tuple[str, ...]) -> Path:
    """The first of `filenames` that the repository has: from the cache, else downloaded into it.
    Raises HubUnavailable (not cached, and the hub cannot be reached), BackboneError (no such
    repository, or none of the files)."""
    for filename in filenames:
        found = cached_hub_file(repo, filename)
        if found:
            return found
    reason = _offline_reason()
    if reason:
        raise HubUnavailable(reason)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=hf_cache(), etag_timeout=DOWNLOAD_TIMEOUT_S))
        except LocalEntryNotFoundError as exc:  # not cached, and the hub did not answer
            raise HubUnavailable(_first_line(exc)) from None
        except EntryNotFoundError:  # the repository has no such file: try the next
            continue
        except GatedRepoError:
            raise HubUnavailable(
                f"{repo} is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
            ) from None
        except RepositoryNotFoundError:
            raise BackboneError(f"no repository {repo} on the Hugging Face hub (or it is private)") from None
        except Exception as exc:
            raise HubUnavailable(_first_line(exc)) from None
    raise BackboneError(f"the Hugging Face repository {repo} has none of {', '.join(filenames)}")


def card_license(repo: str) -> str | None:
    """The licence that the repository's cached model card names in its metadata (None if the card is
    not cached or names none)."""
    card = cached_hub_file(repo, CARD)
    if card is None:
        return None
    try:
        text = card.read_text(errors="replace")
    except OSError:
        return None
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*['\"]?([^'\"\s#]+)", front.group(1), re.M) if front else None
    return found.group(1).lower() if found else None


def _fetch_card(repo: str) -> None:
    """Cache the model card next to the weights (for their licence); never fails a run."""
    with contextlib.suppress(Exception):
        fetch_hub_file(repo, (CARD,))


def _unavailable(name: str, what: str, repo: str, filename: str, reason: str) -> WeightsUnavailable:
    """The one message of hub files that are missing here: the repository, the cache, the command that
    fetches them (the whole repository when `filename` is empty)."""
    cache = hf_cache()
    return WeightsUnavailable(
        f"{name}: {what}, from {repo}, are not in the Hugging Face cache {cache} and cannot be downloaded "
        f"({reason}).\n"
        f"  Fetch them on a machine with internet access:\n"
        f"    hf download {repo}{' ' + filename if filename else ''} --cache-dir {cache}\n"
        f"  then copy that folder here (or point HF_HOME at the folder that holds hub/), or pass "
        f"--weights FILE (.safetensors or a state dict), or --weights none for random init (tests only)."
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """timm and OpenCLIP log (to the root logger) and warn while they build a model with no weights
    ("initialized randomly"): true of the empty network, misleading to someone whose weights load
    next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _unprefixed(state: dict, prefix: str) -> dict:
    """`state` without `prefix` if every key has it (a state dict of our wrapper, or of a whole model
    whose part this is)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load_strictly(name: str, model: nn.Module, state: dict, path: Path) -> None:
    """Every key of the network and nothing else (batch-norm counters optional), then the tensors. A
    network built on the meta device takes the tensors themselves (cast to its own dtypes), so that no
    memory or time goes into random weights that the file replaces."""
    own = model.state_dict()
    if state_keys(state) != state_keys(own):
        missing, unexpected = sorted(state_keys(own) - state_keys(state)), sorted(state_keys(state) - state_keys(own))
        raise BackboneError(
            f"{path}: not a state dict of {name}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}"
        )
    assign = any(t.is_meta for t in own.values())
    if assign:
        state = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        state.update({k: torch.zeros_like(v, device="cpu") for k, v in own.items() if k not in state})
    try:
        model.load_state_dict(state, strict=False, assign=assign)  # the key sets were compared above
    except RuntimeError as exc:
        raise BackboneError(f"{path}: does not fit {name}: {' '.join(str(exc).split())[:300]}") from None


LOAD_DEVICES = ("meta", "cpu")
"""Where a network whose weights come from a file is built: on the meta device (no random weights to
draw: a large model's initialisation costs more than reading its file), or, where that leaves a tensor
unset (a buffer that no state dict holds) or cannot be built there, on the CPU."""


def _materialized(model: nn.Module) -> bool:
    """No tensor of the network left on the meta device: parameters, buffers, or tensors that a module
    keeps as a plain attribute."""
    plain = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers(), *plain])


class _Loose(nn.Module):
    """Parameters of a module whose other parameters lie in other blocks (a ViT's class token and
    position embeddings belong to the model itself, whose blocks are elsewhere), held under their own
    names so that their block can be trained alone. Not part of the network: only its parameters()
    are used, and they are the network's own tensors."""

    def __init__(self, params: dict[str, nn.Parameter]):
        super().__init__()
        for name, param in params.items():
            self.register_parameter(name.replace(".", "__"), param)


def parameter_blocks(root: nn.Module, groups: list[list[str]]) -> list[list[nn.Module]]:
    """Blocks of modules from groups of parameter names (timm's `group_parameters`), every parameter in
    exactly one block: the largest modules whose parameters all lie in one group, and the parameters of
    modules that span groups held together (`_Loose`)."""
    group_of = {name: k for k, names in enumerate(groups) for name in names}
    blocks: list[list[nn.Module]] = [[] for _ in groups]
    loose: list[dict[str, nn.Parameter]] = [{} for _ in groups]

    def visit(path: str, module: nn.Module) -> None:
        prefix = f"{path}." if path else ""
        inside = {group_of[prefix + name] for name, _ in module.named_parameters()}
        if len(inside) == 1:
            blocks[inside.pop()].append(module)
            return
        for name, param in module.named_parameters(recurse=False):
            loose[group_of[prefix + name]][prefix + name] = param
        for name, child in module.named_children():
            visit(prefix + name, child)

    visit("", root)
    result = [modules + ([_Loose(params)] if params else []) for modules, params in zip(blocks, loose)]
    return [block for block in result if block]


# ------------------------------------------------------------------------------------------- timm


def _timm():
    import timm  # a dependency; imported when a timm: backbone is named

    return timm


class TimmEmbedding(nn.Module):
    """A timm model's embedding: its own pooled pre-logits (`auto`), or a transformer's final class
    token, mean patch token (the tokens after the prefix ones: class and register tokens), or both
    concatenated, each through the model's own pre-logits norm (`fc_norm`, the identity where the
    final norm comes before pooling, as in DINOv2)."""

    def __init__(self, model: nn.Module, pool: str):
        super().__init__()
        self.model = model
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.model.forward_features(x))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of the model's final features (`forward_features`)."""
        if self.pool == "auto":
            return self.model.forward_head(features, pre_logits=True)
        norm = getattr(self.model, "fc_norm", None)
        parts = {"token": features[:, 0], "avg": features[:, self.model.num_prefix_tokens :].mean(dim=1)}
        pooled = [parts[p] if norm is None else norm(parts[p]) for p in TOKEN_POOLS[self.pool]]
        return torch.cat(pooled, dim=-1) if len(pooled) > 1 else pooled[0]


_DIMS: dict[tuple[str, BackboneOptions], int] = {}
"""Embedding sizes of hub backbones, by name and options, found by building them on the meta device."""


class TimmFamily(Family):
    """`timm:<name>`: any timm model, with or without a pretrained tag (`convnext_tiny.fb_in22k`), or
    `timm:hf-hub:ORG/REPO`; its default weights are its pretrained tag's (timm's default tag when the
    name has none)."""

    def __init__(self, model: str, options: BackboneOptions = DEFAULT_OPTIONS, config: dict | None = None):
        """`config`: a hub model's parsed config.json, when a configured copy is made."""
        self.model = model
        self.name = TIMM_PREFIX + model
        self.dim = None
        self.options = options
        self.repo = model[len(HF_HUB_PREFIX) :] if model.startswith(HF_HUB_PREFIX) else ""
        self._config = config
        if not self.repo:
            self._check_name()

    def _check_name(self) -> None:
        timm = _timm()
        arch, _, tag = self.model.partition(".")
        if not timm.is_model(arch):
            raise BackboneError(
                f"unknown timm model {arch!r}; `cli.py backbones --search WORD` lists timm's pretrained models"
            )
        try:
            timm.models.get_pretrained_cfg(self.model)
        except RuntimeError:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
            raise BackboneError(
                f"timm model {arch} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or 'none'}"
            ) from None

    # --- what the name stands for

    def _hub_config(self) -> dict:
        """A hub model's config.json (timm's format: architecture, pretrained_cfg, model_args)."""
        if self._config is None:
            try:
                path = fetch_hub_file(self.repo, (TIMM_CONFIG,))
            except HubUnavailable as exc:
                raise _unavailable(self.name, "its config and weights", self.repo, "", str(exc)) from None
            config = json.loads(path.read_text())
            if "pretrained_cfg" not in config or "architecture" not in config:
                raise BackboneError(f"{self.name}: {path} is not a timm model config (no architecture)")
            self._config = config
        return self._config

    @property
    def pretrained_cfg(self) -> dict:
        """The weights' pretrained config: input size, interpolation, crop, mean, std, licence, files."""
        if self.repo:
            config = self._hub_config()
            cfg = dict(config["pretrained_cfg"])
            if "num_classes" in config:  # the repository's classifier, as timm reads it
                cfg["num_classes"] = config["num_classes"]
            return {**cfg, "hf_hub_id": self.repo}
        found = _timm().models.get_pretrained_cfg(self.model)
        return found.to_dict() if found is not None else {}

    def _create(self, **kwargs) -> nn.Module:
        """timm's model of this name, random weights (nothing downloaded)."""
        timm = _timm()
        if self.repo:
            config = self._hub_config()
            kwargs = {**config.get("model_args", {}), "pretrained_cfg": self.pretrained_cfg, **kwargs}
            return timm.create_model(config["architecture"], pretrained=False, **kwargs)
        return timm.create_model(self.model, pretrained=False, **kwargs)

    @property
    def native_size(self) -> int:
        return int(self.pretrained_cfg.get("input_size", (3, 224, 224))[-1])

    def _size_kwargs(self) -> dict:
        """A model of a fixed input size (a ViT's position embeddings) is built at --input-size; others
        take any size as they are."""
        size = self.options.input_size
        if not size or size == self.native_size or not self.pretrained_cfg.get("fixed_input_size", False):
            return {}
        return {"img_size": size}

    def configure(self, options: BackboneOptions) -> Family:
        if options.clip_embed != DEFAULT_OPTIONS.clip_embed:
            raise BackboneError(f"--clip-embed {options.clip_embed}: applies to open_clip: backbones, not {self.name}")
        if options == self.options:
            return self
        return TimmFamily(self.model, options, config=self._config)

    @property
    def settings(self) -> dict[str, str | int]:
        return {"pool": self.options.pool, "input_size": self.preprocess.crop}

    @property
    def license(self) -> str:
        cfg = self.pretrained_cfg
        repo = self.repo or cfg.get("hf_hub_id") or ""
        return str(cfg.get("license") or (card_license(repo.rstrip("/")) if repo else None) or "unknown")

    @property
    def default_weights(self) -> str:
        cfg = self.pretrained_cfg
        if cfg.get("hf_hub_id"):
            return str(cfg["hf_hub_id"]).rstrip("/")
        return os.path.basename(cfg.get("url") or "")

    @property
    def preprocess(self) -> Preprocess:
        """timm's `resolve_data_config` of the pretrained config, at --input-size when given."""
        from timm.data import resolve_data_config

        size = self.options.input_size
        args = {"input_size": (3, size, size)} if size else {}
        data = resolve_data_config(args, pretrained_cfg=self.pretrained_cfg or {"input_size": (3, 224, 224)})
        _, height, width = data["input_size"]
        if height != width:
            raise BackboneError(
                f"{self.name}: its weights take {height}x{width} px inputs; pass --input-size N for a square one"
            )
        crop_pct = float(data.get("crop_pct") or 0.875)  # timm's DEFAULT_CROP_PCT
        mode = data.get("crop_mode") or "center"
        if mode not in CROP_MODES:
            raise BackboneError(f"{self.name}: unknown crop mode {mode!r} in its pretrained config")
        mean, std = tuple(data["mean"]), tuple(data["std"])
        if len(mean) != 3 or len(std) != 3:
            raise BackboneError(f"{self.name}: its weights take {len(mean)}-channel inputs, not RGB")
        return Preprocess(
            resize=math.floor(width / crop_pct),
            crop=int(width),
            mean=tuple(float(v) for v in mean),
            std=tuple(float(v) for v in std),
            interpolation=str(data.get("interpolation") or "bilinear"),
            crop_pct=crop_pct,
            crop_mode=mode,
        )

    # --- the network

    def architecture(self) -> nn.Module:
        kwargs = self._size_kwargs()
        try:
            with _quiet():
                return self._create(**kwargs)
        except TypeError as exc:
            if kwargs:
                raise BackboneError(
                    f"--input-size {self.options.input_size}: {self.name} cannot be built at another size than "
                    f"its own {self.native_size} px ({_first_line(exc)})"
                ) from None
            raise

    def _embedding(self, model: nn.Module) -> TimmEmbedding:
        model.reset_classifier(0)
        return TimmEmbedding(model, self.options.pool)

    def strip(self, model: nn.Module) -> nn.Module:
        embedding = self._embedding(model)
        embedding.embedding_dim = self.embedding_dim()
        return embedding

    def embedding_dim(self) -> int:
        """Read off the network, built and run on the meta device (no memory, no arithmetic) once per
        process, name and options: timm records no embedding size in its configs. This also checks
        that --pool and --input-size work with the model."""
        key = (self.name, self.options)
        if key not in _DIMS:
            size = self.preprocess.crop
            with torch.random.fork_rng(devices=[]):
                try:
                    with torch.device("meta"):
                        model = self.architecture()
                except BackboneError:
                    raise
                except Exception:  # a model that computes with its parameters while it is built
                    model = self.architecture()
            device = next(model.parameters()).device
            x = torch.zeros(1, 3, size, size, device=device)
            try:
                features = model.forward_features(x)
            except Exception as exc:
                raise BackboneError(f"{self.name}: cannot embed {size} px inputs ({_first_line(exc)})") from None
            self._check_pool(model, features)
            out = self._embedding(model).pooled(features)
            if out.ndim != 2:
                raise BackboneError(f"{self.name}: gives {tuple(out.shape)[1:]} per image, not a vector")
            _DIMS[key] = int(out.shape[1])
        return _DIMS[key]

    def listed_dim(self) -> int | None:
        """The embedding size as `backbones --search` shows it: the size timm gives its pre-logits
        (`head_hidden_size`), read off the network built on the meta device, without running it."""
        with torch.device("meta"):
            model = self.architecture()
        return int(getattr(model, "head_hidden_size", None) or model.num_features)

    def _check_pool(self, model: nn.Module, features: torch.Tensor) -> None:
        pool = self.options.pool
        if pool == "auto":
            return
        tokens = features.ndim == 3 and hasattr(model, "num_prefix_tokens")
        if not tokens:
            raise BackboneError(
                f"--pool {pool}: {self.name} has no tokens to pool (it is not a transformer); --pool auto "
                "uses its own pooling"
            )
        if "token" in TOKEN_POOLS[pool] and getattr(model, "cls_token", None) is None:
            raise BackboneError(f"--pool {pool}: {self.name} has no class token; use --pool avg or auto")

    def blocks(self, model: nn.Module) -> list[list[nn.Module]]:
        """timm's own grouping of the model (`group_matcher(coarse=True)`: a ViT's blocks, a ConvNeXt's
        stages), the stem's loose parameters (class token, position embeddings) in the first block."""
        from timm.models import group_parameters

        inner = model.model
        groups = group_parameters(inner, inner.group_matcher(coarse=True))
        return parameter_blocks(model, [[f"model.{n}" for n in groups[k]] for k in sorted(groups)])

    # --- weights

    def _weight_files(self) -> tuple[str, ...]:
        cfg = self.pretrained_cfg
        return (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else TIMM_WEIGHTS

    def default_file(self) -> Path:
        cfg = self.pretrained_cfg
        if cfg.get("hf_hub_id"):
            repo = self.default_weights
            for filename in self._weight_files():
                found = cached_hub_file(repo, filename)
                if found:
                    return found
            return hf_cache() / f"models--{repo.replace('/', '--')}" / self._weight_files()[0]
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.get("url") or "none")

    def fetch_default(self) -> Path:
        cfg = self.pretrained_cfg
        if cfg.get("custom_load") and (cfg.get("custom_load") == "hf" or not cfg.get("hf_hub_id")):
            raise WeightsUnavailable(
                f"{self.name}: its weights load through timm's own custom loader (not a state dict); "
                "pass --weights FILE with a state dict of the model"
            )
        if cfg.get("hf_hub_id"):
            repo = self.default_weights
            try:
                path = fetch_hub_file(repo, self._weight_files())
            except HubUnavailable as exc:
                raise _unavailable(self.name, "the default weights", repo, self._weight_files()[0], str(exc)) from None
            if not cfg.get("license"):
                _fetch_card(repo)
            return path
        if cfg.get("url"):
            return self._fetch_url(cfg["url"])
        raise WeightsUnavailable(
            f"{self.name}: timm has no pretrained weights for it; pass --weights FILE, or --weights none"
        )

    def _fetch_url(self, url: str) -> Path:
        """Weights timm publishes only by URL, in torch's hub cache as timm keeps them."""
        path = self.default_file()
        if path.is_file():
            return path
        reason = _offline_reason()
        if reason is None:
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), progress=True)
                return path
            except OSError as exc:
                reason = _first_line(exc)
            finally:
                socket.setdefaulttimeout(previous)
        raise WeightsUnavailable(
            f"{self.name}: the default weights are not cached and cannot be downloaded ({reason}).\n"
            f"  Download {url}\n  on a machine with internet access and put it in {path.parent}, or pass "
            "--weights FILE, or --weights none for random init (tests only)."
        )

    def load_state(self, state: dict, path: Path) -> nn.Module:
        """A state dict of the model (any classifier, or none), of our embedding (a fine-tuned
        backbone.pt), or in a format timm converts (the architecture's own `checkpoint_filter_fn`, the
        function timm applies to pretrained weights: original DINOv2 or OpenCLIP checkpoints, position
        embeddings resampled to --input-size)."""
        state = _unprefixed(state, "model.")
        for device in LOAD_DEVICES:
            try:
                with torch.device(device):
                    model = self.architecture()
            except BackboneError:
                raise
            except Exception:
                if device != LOAD_DEVICES[-1]:
                    continue  # a model that computes with its parameters while it is built
                raise
            full = set(model.state_dict())
            model.reset_classifier(0)
            removed = full - set(model.state_dict())  # the classifier: not part of the embedding
            converted = state
            convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
            if callable(convert):
                with contextlib.suppress(Exception):  # not a format it knows: the key check below says so
                    converted = convert(dict(state), model)
            _load_strictly(self.name, model, {k: v for k, v in converted.items() if k not in removed}, path)
            if _materialized(model):
                break
        return self.strip(model)


# ------------------------------------------------------------------------------------------ OpenCLIP


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise BackboneError(
            "open_clip: backbones need the package open-clip-torch, the project's `clip` extra: "
            "pip install -e '.[clip]' (or `make venv`)"
        ) from None
    return open_clip


class OpenClipFamily(Family):
    """`open_clip:<arch>/<pretrained>` (e.g. `open_clip:ViT-B-32/openai`), `open_clip:<arch>` (random or
    a FILE only) or `open_clip:hf-hub:ORG/REPO`: the model's image tower."""

    def __init__(self, model: str, options: BackboneOptions = DEFAULT_OPTIONS, config: dict | None = None):
        self.model = model
        self.name = OPEN_CLIP_PREFIX + model
        self.dim = None
        self.options = options
        self.repo = model[len(HF_HUB_PREFIX) :] if model.startswith(HF_HUB_PREFIX) else ""
        self.arch, _, self.tag = ("", "", "") if self.repo else model.partition("/")
        self._config = config
        if not self.repo:
            self._check_name()

    def _check_name(self) -> None:
        open_clip = _open_clip()
        if open_clip.get_model_config(self.arch) is None:
            raise BackboneError(
                f"unknown OpenCLIP model {self.arch!r}; `cli.py backbones --search WORD` lists the pretrained ones"
            )
        if self.tag and not open_clip.get_pretrained_cfg(self.arch, self.tag):
            tags = open_clip.list_pretrained_tags_by_model(self.arch)
            raise BackboneError(
                f"OpenCLIP model {self.arch} has no pretrained tag {self.tag!r}; its tags: {', '.join(tags) or 'none'}"
            )

    def _hub_config(self) -> tuple[dict, Path]:
        """A hub model's open_clip_config.json (model_cfg, preprocess_cfg), and where it lies."""
        try:
            path = fetch_hub_file(self.repo, (OPEN_CLIP_CONFIG,))
        except HubUnavailable as exc:
            raise _unavailable(self.name, "its config and weights", self.repo, "", str(exc)) from None
        if self._config is None:
            config = json.loads(path.read_text())
            if "model_cfg" not in config:
                raise BackboneError(f"{self.name}: {path} is not an OpenCLIP config (no model_cfg)")
            self._config = config
        return self._config, path

    @property
    def _tag_cfg(self) -> dict:
        return dict(_open_clip().get_pretrained_cfg(self.arch, self.tag) or {}) if self.tag else {}

    @property
    def _model_cfg(self) -> dict:
        return self._hub_config()[0]["model_cfg"] if self.repo else _open_clip().get_model_config(self.arch)

    @property
    def _timm_tower(self) -> bool:
        return "timm_model_name" in self._model_cfg.get("vision_cfg", {})

    @property
    def native_size(self) -> int:
        size = self._model_cfg.get("vision_cfg", {}).get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if size[0] != size[1]:
                raise BackboneError(f"{self.name}: its tower takes {size[0]}x{size[1]} px inputs, not square ones")
            size = size[0]
        return int(size)

    def configure(self, options: BackboneOptions) -> Family:
        if options.pool != DEFAULT_OPTIONS.pool:
            raise BackboneError(
                f"--pool {options.pool}: applies to timm: transformers; {self.name} pools as OpenCLIP trained it"
            )
        if options == self.options:
            return self
        return OpenClipFamily(self.model, options, config=self._config)

    @property
    def settings(self) -> dict[str, str | int]:
        return {"clip_embed": self.options.clip_embed, "input_size": self.preprocess.crop}

    def _weights_location(self) -> tuple[str, tuple[str, ...]]:
        """(repository, its files to try) of the default weights; ("", ()) where there are none."""
        if self.repo:
            return self.repo, OPEN_CLIP_WEIGHTS
        hub = self._tag_cfg.get("hf_hub", "")
        if not hub:
            return "", ()
        repo, filename = os.path.split(hub)  # OpenCLIP's 'org/repo/' (its default files) or 'org/repo/file'
        if not filename or filename == OPEN_CLIP_WEIGHTS[1]:
            return repo, OPEN_CLIP_WEIGHTS
        stem, suffix = os.path.splitext(filename)
        # OpenCLIP prefers a file's safetensors twin where the repository has one
        return repo, ((f"{stem}.safetensors", filename) if suffix in (".bin", ".pth") else (filename,))

    @property
    def license(self) -> str:
        repo, _ = self._weights_location()
        return (card_license(repo) if repo else None) or "unknown"

    @property
    def default_weights(self) -> str:
        repo, _ = self._weights_location()
        return repo

    @property
    def preprocess(self) -> Preprocess:
        """OpenCLIP's: the tower's input size, the pretrained tag's (or hub config's) mean, std,
        interpolation and resize mode (`shortest`: resize the shorter side, centre crop; `squash`)."""
        from open_clip.transform import PreprocessCfg

        cfg = {**vars(PreprocessCfg()), **self._tag_cfg}
        if self.repo:
            cfg.update(self._hub_config()[0].get("preprocess_cfg", {}))
        modes = {"shortest": "center", "squash": "squash"}
        if cfg["resize_mode"] not in modes:
            raise BackboneError(f"{self.name}: OpenCLIP's resize mode {cfg['resize_mode']!r} is not supported here")
        size = self.options.input_size or self.native_size
        return Preprocess(
            resize=size,
            crop=size,
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg["interpolation"]),
            crop_pct=1.0,
            crop_mode=modes[cfg["resize_mode"]],
        )

    def architecture(self) -> nn.Module:
        """The whole CLIP model, random weights: OpenCLIP builds towers only as parts of one. A ViT tower
        is built at --input-size (its position embeddings are resized as weights load); a timm tower is
        set to it after loading (`strip`), as OpenCLIP does."""
        open_clip = _open_clip()
        size = self.options.input_size
        kwargs = {
            "pretrained": None,
            "load_weights": False,
            "pretrained_text": False,
            "force_quick_gelu": bool(self._tag_cfg.get("quick_gelu", False)),  # as the weights were trained
            "device": torch.get_default_device(),  # OpenCLIP moves the model there: meta when sizing it
        }
        if size and size != self.native_size and not self._timm_tower:
            kwargs["force_image_size"] = size
        name = f"local-dir:{self._hub_config()[1].parent}" if self.repo else self.arch
        with _quiet():
            return open_clip.create_model(name, **kwargs)

    def strip(self, model: nn.Module) -> nn.Module:
        """The image tower, before its projection (`pre`) or after it (`post`)."""
        tower = self._tower(model)
        tower.embedding_dim = self.embedding_dim()
        return tower

    def _tower(self, model: nn.Module) -> nn.Module:
        tower = model.visual
        size = self.options.input_size
        if self._timm_tower and size and size != self.native_size:
            if not hasattr(tower, "set_input_size"):
                raise BackboneError(f"--input-size {size}: {self.name}'s tower cannot be set to another size")
            tower.set_input_size(size)
        if self.options.clip_embed == "post":
            return tower
        if hasattr(tower, "proj") and hasattr(tower, "transformer"):  # OpenCLIP's ViT: pooled @ proj
            tower.proj = None
        elif hasattr(tower, "trunk") and hasattr(tower, "head"):  # a timm trunk, then a projection head
            tower.head = nn.Identity()
            tower.trunk.reset_classifier(0)  # a trunk whose own classifier is the projection
        else:
            raise BackboneError(
                f"--clip-embed pre: {self.name}'s image tower ({type(tower).__name__}) ends in its projection "
                "(attention pooling); use --clip-embed post"
            )
        return tower

    def embedding_dim(self) -> int:
        key = (self.name, self.options)
        if key not in _DIMS:
            size = self.preprocess.crop
            with torch.device("meta"):
                tower = self._tower(self.architecture())
                try:
                    out = tower(torch.zeros(1, 3, size, size))
                except Exception as exc:
                    raise BackboneError(f"{self.name}: cannot embed {size} px inputs ({_first_line(exc)})") from None
            if out.ndim != 2:
                raise BackboneError(
                    f"--clip-embed {self.options.clip_embed}: {self.name} gives {tuple(out.shape)[1:]} per "
                    "image before its projection, not a vector; use --clip-embed post"
                )
            _DIMS[key] = int(out.shape[1])
        return _DIMS[key]

    def listed_dim(self) -> int | None:
        """The embedding size as `backbones --search` shows it (`pre`): the tower's width, read off the
        network built on the meta device, without running it; None for other towers."""
        with torch.device("meta"):
            tower = self.architecture().visual
        if hasattr(tower, "transformer") and hasattr(tower.transformer, "width"):
            return int(tower.transformer.width)
        trunk = getattr(tower, "trunk", None)
        return int(getattr(trunk, "head_hidden_size", None) or trunk.num_features) if trunk is not None else None

    def blocks(self, model: nn.Module) -> list[list[nn.Module]]:
        """A timm trunk's own grouping (its projection head in the last block), or an OpenCLIP ViT's
        stem, residual blocks and final norm (with the projection); other towers (ResNets) as any
        backbone's children."""
        from timm.models import group_parameters

        if hasattr(model, "trunk") and hasattr(model.trunk, "group_matcher"):
            groups = group_parameters(model.trunk, model.trunk.group_matcher(coarse=True))
            named = [[f"trunk.{n}" for n in groups[k]] for k in sorted(groups)]
            named[-1] += [n for n, _ in model.named_parameters() if not n.startswith("trunk.")]
            return parameter_blocks(model, named)
        if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):
            matcher = {
                "stem": r"^(class_embedding|positional_embedding|conv1|ln_pre|patch_dropout)",
                "blocks": [(r"^transformer\.resblocks\.(\d+)", None), (r"^(ln_post|proj|attn_pool)", (99999,))],
            }
            groups = group_parameters(model, matcher)
            return parameter_blocks(model, [groups[k] for k in sorted(groups)])
        return super().blocks(model)

    # --- weights

    def default_file(self) -> Path:
        repo, files = self._weights_location()
        for filename in files:
            found = cached_hub_file(repo, filename)
            if found:
                return found
        return hf_cache() / f"models--{repo.replace('/', '--')}" / (files[0] if files else "none")

    def fetch_default(self) -> Path:
        repo, files = self._weights_location()
        if not repo:
            tags = ", ".join(_open_clip().list_pretrained_tags_by_model(self.arch)) or "none"
            raise WeightsUnavailable(
                f"{self.name}: names no pretrained weights: name them as {self.name}/<pretrained> (its tags: "
                f"{tags}), or pass --weights FILE, or --weights none"
            )
        try:
            path = fetch_hub_file(repo, files)
        except HubUnavailable as exc:
            raise _unavailable(self.name, "the default weights", repo, files[0], str(exc)) from None
        _fetch_card(repo)
        return path

    def load_state(self, state: dict, path: Path) -> nn.Module:
        """A whole CLIP checkpoint (its `visual.` part; a ViT's position embeddings resized to
        --input-size as OpenCLIP does), or a state dict of the tower (ours: a fine-tuned backbone.pt)."""
        from open_clip.model import resize_pos_embed

        state = _unprefixed(state, "module.")
        for device in LOAD_DEVICES:
            with torch.device(device):
                model = self.architecture()
            tower_state = state
            if any(k.startswith("visual.") for k in state):
                tower_state = dict(state)
                resize_pos_embed(tower_state, model)
                tower_state = {k[len("visual.") :]: v for k, v in tower_state.items() if k.startswith("visual.")}
            full = set(model.visual.state_dict())
            tower = self._tower(model)
            removed = full - set(tower.state_dict())  # the projection, for `pre`
            _load_strictly(self.name, tower, {k: v for k, v in tower_state.items() if k not in removed}, path)
            if _materialized(tower):
                break
        tower.embedding_dim = self.embedding_dim()
        return tower


# --------------------------------------------------------------------------------- backbones --search


class SearchRow:
    """One pretrained model of `backbones --search`: how to name it and what it is."""

    def __init__(self, name: str, dim: int | None, size: int | None, license: str, cached: bool):
        self.name, self.dim, self.size, self.license, self.cached = name, dim, size, license, cached


def search(word: str) -> list[SearchRow]:
    """Pretrained timm models (and OpenCLIP ones, where it is installed) whose names contain `word`,
    from their configs and the cache alone; embedding sizes where at most SEARCH_SIZES_UP_TO
    architectures match."""
    timm = _timm()
    pattern = f"*{word}*"
    rows: list[tuple[TimmFamily | OpenClipFamily, str]] = []
    for name in timm.list_pretrained(pattern):
        rows.append((TimmFamily(name), name.partition(".")[0]))
    with contextlib.suppress(BackboneError):
        open_clip = _open_clip()
        for arch, tag in open_clip.list_pretrained():
            if fnmatch.fnmatch(f"{arch}/{tag}".lower(), pattern.lower()):
                rows.append((OpenClipFamily(f"{arch}/{tag}"), arch))
    build = len({arch for _, arch in rows}) <= SEARCH_SIZES_UP_TO
    dims: dict[str, int | None] = {}  # by architecture: a tag does not change it
    found = []
    for family, arch in rows:
        if build and arch not in dims:
            dims[arch] = None
            with contextlib.suppress(Exception):
                dims[arch] = family.listed_dim()
        dim = dims.get(arch)
        try:
            size: int | None = family.preprocess.crop
        except BackboneError:
            size = None
        found.append(SearchRow(family.name, dim, size, family.license, family.weights_present()))
    return found
