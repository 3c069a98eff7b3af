"""Explanation heatmaps: where in an image a run's decision comes from (`predict --explain`, and the
report's error gallery).

Each image is preprocessed as the run's store was (upright RGB, resize, centre crop) and explained for
one class, the target: the run's positive class, or the predicted one where the run has none. The
method follows the head (`head_method`):

- Grad-CAM for heads that are torch modules once fitted (linear, mlp, and fine-tuned runs' heads): the
  backbone and the head (classify/finetune/model.py's `head_module`) form one network, and the output
  of the backbone's last block (its family's `blocks`) that is a feature map and reaches the target
  is weighted by the mean gradient of the target's logit margin (its logit minus the mean of the
  others': for a binary linear head, whose logits are (0, s), this is s itself, and unlike a raw
  logit it is never a constant, whose gradient is zero). A transformer's (B, tokens, C) output loses
  its prefix tokens and is laid out on its patch grid.
- Occlusion for any other head (xgboost, knn): a grey patch (the normalisation mean) slides over the
  picture; every occluded copy is embedded and scored by the run's head, calibrated; a pixel's heat
  is the mean drop of the target's probability over the patches covering it.

Grad-CAM is written here (about 40 lines) rather than taken from the `grad-cam` package: that package
pulls in opencv-python and ttach, and wants one model from image to logits, while here the network
is composed of our backbone, our head, the run's test-time views (each view's map turned back before
they are averaged) and its pooling of them, which its wrappers would have to be taught anyway.

Images are explained with torch in float32 whatever runtime and precision the run's store was
extracted with (OpenVINO, bf16 and int8 are for throughput; gradients need torch), with the same
weights and preprocessing. The probability an explanation shows is that of this float32 embedding,
calibrated as the run was, so it can differ from `predict`'s by the store's rounding.

A run whose head reads several backbones or metadata columns is refused (`ExplainError`): a heatmap
over one image cannot show the share of another backbone's input or of the patient's age. Images that
cannot be read are not explained and do not stop the others: `explain` adds them, image id -> reason,
to the `failed` dict its caller passes (`predict`'s reasons).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import nn
from torch.nn import functional as F

from classify.finetune.model import head_module
from classify.runs import Run, load_run, recorded_options, weights_option
from extract.backbones import Backbone, get_family, load_backbone
from extract.images import failure_reason, load_image
from extract.manifest import read_paths
from extract.preprocess import VIEWS, apply_views
from extract.run import resolve_device
from features.store import stored_name

__all__ = [
    "GRAD_CAM",
    "METHODS",
    "OCCLUSION",
    "ExplainError",
    "Explainer",
    "Explanation",
    "Method",
    "Occlusion",
    "check_explainable",
    "embed",
    "explain",
    "explain_picture",
    "grad_cam",
    "head_method",
    "load_explainer",
    "occlusion",
    "overlay",
    "probabilities",
    "save_overlay",
    "write_explanations",
]


class ExplainError(ValueError):
    """A run or an option that cannot be explained; the message names the problem and the fix."""


@dataclass
class Explanation:
    """One image explained for one class."""

    image_id: str
    image: np.ndarray
    """(H, W, 3) uint8: the picture as the model saw it (after the run's resize and crop, before
    normalisation)."""
    heat: np.ndarray
    """(H, W) float32 in [0, 1], the same size as `image`; all 0 where nothing raised the target."""
    method: str
    """The method's name ("Grad-CAM" or "occlusion")."""
    target: str
    """The class explained."""
    probability: float
    """The run's calibrated probability of `target` for this image."""


@dataclass(frozen=True)
class Occlusion:
    """How occlusion slides its patch."""

    patch: int = 0
    """Side of the square patch in pixels of the model's input; 0: a seventh of it."""
    stride: int = 0
    """Pixels between patches; 0: the patch's side (a 7 x 7 grid by default, the resolution of a 224 px
    CNN's last feature map, at 50 forward passes an image; half the patch gives a finer map at about
    three times the passes)."""
    batch_size: int = 16
    """Occluded copies embedded per forward pass."""


@dataclass(frozen=True)
class Explainer:
    """A run made ready to explain images: its head, and the backbone its store was embedded with
    (torch, float32, eval mode) on `device`. Another backbone can be put in its place
    (`dataclasses.replace`) to test the method, as the randomisation check does."""

    run: Run
    backbone: Backbone
    method: Method
    device: torch.device = torch.device("cpu")
    views: str = "none"
    """The test-time views the run's store averaged (or, for a run on every view, scored one by one)."""
    occlusion: Occlusion = Occlusion()
    head: nn.Module | None = field(default=None, compare=False)
    """The head as a torch module (Grad-CAM only)."""

    def __post_init__(self) -> None:
        self.backbone.module.to(self.device).eval()
        if self.head is not None:
            self.head.to(self.device).eval()


@dataclass(frozen=True)
class Method:
    """A way of making a heatmap: `heat(explainer, picture, target)` maps a (3, H, W) uint8 picture and
    the index of the class explained to an (H, W) map in [0, 1]."""

    name: str
    heat: Callable[[Explainer, torch.Tensor, int], np.ndarray]
    differentiable: bool
    """Whether it needs the head as a torch module."""


# ------------------------------------------------------------------------------------------ embedding


def embed(explainer: Explainer, pictures: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 to the head's input as the run's store holds it: (B, d), the mean of the
    test-time views, or (B, V, d) for a run on every view; float32, on the explainer's device. Grad-CAM
    runs it with gradients, `probabilities` without."""
    n_views = len(VIEWS[explainer.views])
    x = apply_views(pictures.to(explainer.device), explainer.views)  # views commute with normalising
    emb = explainer.backbone.module(explainer.backbone.preprocess.normalize(x)).float()
    emb = emb.view(n_views, len(pictures), -1).transpose(0, 1)
    return emb if explainer.run.inputs.all_views else emb.mean(dim=1)


def probabilities(explainer: Explainer, pictures: torch.Tensor) -> np.ndarray:
    """The run's calibrated class probabilities of (B, 3, H, W) uint8 pictures."""
    with torch.inference_mode():
        x = embed(explainer, pictures).cpu().numpy()
    return explainer.run.proba(x)


# ------------------------------------------------------------------------------------------- Grad-CAM


def grad_cam(explainer: Explainer, picture: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM of the target's logit margin through backbone and head, averaged over the run's views,
    on the output of the backbone's last block that is a feature map (or a patch grid) and reaches the
    target: a ViT that reads its class token weighs the patch tokens where they enter its last block,
    as its later outputs pass nothing of them on."""
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or output.ndim not in (3, 4):
            return None
        if not output.requires_grad:  # the first block's output: the backward pass ends here
            output = output.detach().requires_grad_()
        captured.append(output)
        return output.clone()  # in-place layers after the block change the copy, not what is weighed

    backbone = explainer.backbone
    blocks = [m for group in get_family(backbone.name).blocks(backbone.module) for m in group]
    hooks = [m.register_forward_hook(keep) for m in blocks]
    try:
        with torch.enable_grad():
            logits = explainer.head(embed(explainer, picture[None]))
            logits = logits.reshape(-1, logits.shape[-1])  # a run on every view: a row per view
            others = (logits.sum(dim=1) - logits[:, target]) / max(logits.shape[1] - 1, 1)
            score = (logits[:, target] - others).sum()
            grads = torch.autograd.grad(score, captured, allow_unused=True) if captured else ()
    finally:
        for hook in hooks:
            hook.remove()
    for acts, grad in reversed(list(zip(captured, grads))):
        acts, grad = _spatial(acts.detach(), backbone.module), _spatial(grad, backbone.module)
        if acts is not None and grad is not None and bool(grad.any()):
            break
    else:
        raise ExplainError(
            f"{backbone.name}: none of its blocks gives a feature map that reaches the target for Grad-CAM "
            "to weigh; explain it with --method occlusion"
        )
    cams = F.relu((grad.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))  # (V, h, w)
    cam = torch.stack([_unview(view, c) for view, c in zip(VIEWS[explainer.views], cams)]).mean(dim=0)
    size = picture.shape[-2:]
    heat = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return _unit(heat.cpu().numpy())


def _spatial(x: torch.Tensor | None, module: nn.Module) -> torch.Tensor | None:
    """A block's output as (B, C, h, w): a feature map as it is, a transformer's (B, tokens, C) without
    its prefix (class, register) tokens, on the square patch grid; None for anything else."""
    if x is None or x.ndim == 4:
        return x
    prefix = next((m.num_prefix_tokens for m in module.modules() if hasattr(m, "num_prefix_tokens")), None)
    tokens = x.shape[1]
    if prefix is None:
        prefix = tokens - math.isqrt(tokens) ** 2
    side = math.isqrt(max(tokens - prefix, 0))
    if side == 0 or side * side != tokens - prefix:
        return None
    return x[:, prefix:].transpose(1, 2).reshape(len(x), -1, side, side)


def _unview(view: Callable[[torch.Tensor], torch.Tensor], cam: torch.Tensor) -> torch.Tensor:
    """A (h, w) map of a view back in the picture's orientation: the view moves pixels (a rotation, a
    flip), so where it sends each position is read off a grid of positions."""
    h, w = cam.shape
    where = view(torch.arange(h * w, device=cam.device).view(1, 1, h, w)).flatten()
    back = torch.empty(h * w, dtype=cam.dtype, device=cam.device)
    back[where] = cam.flatten()
    return back.view(h, w)


def _unit(heat: np.ndarray) -> np.ndarray:
    """Clipped at 0 and scaled to [0, 1] by its maximum (all 0 when nothing is above 0)."""
    heat = np.clip(np.nan_to_num(heat.astype(np.float32)), 0, None)
    top = float(heat.max()) if heat.size else 0.0
    return heat / top if top > 0 else np.zeros_like(heat)


# ------------------------------------------------------------------------------------------ occlusion


def occlusion(explainer: Explainer, picture: torch.Tensor, target: int) -> np.ndarray:
    """The mean drop of the target's probability when a grey patch covers each pixel."""
    _, height, width = picture.shape
    patch = explainer.occlusion.patch or max(1, round(min(height, width) / 7))
    stride = explainer.occlusion.stride or patch
    if not 1 <= patch <= min(height, width) or stride < 1:
        raise ExplainError(
            f"occlusion patch {patch}, stride {stride}: the patch must fit the {width}x{height} input and the "
            "stride be at least 1 pixel"
        )
    grey = torch.tensor([round(255 * m) for m in explainer.backbone.preprocess.mean], dtype=torch.uint8)
    boxes = [(y, x) for y in _starts(height, patch, stride) for x in _starts(width, patch, stride)]
    base = probabilities(explainer, picture[None])[0, target]
    drop, cover = np.zeros((height, width)), np.zeros((height, width))
    for at in range(0, len(boxes), explainer.occlusion.batch_size):
        chunk = boxes[at : at + explainer.occlusion.batch_size]
        copies = picture.repeat(len(chunk), 1, 1, 1)
        for copy, (y, x) in zip(copies, chunk):
            copy[:, y : y + patch, x : x + patch] = grey.view(3, 1, 1)
        for (y, x), p in zip(chunk, probabilities(explainer, copies)[:, target]):
            drop[y : y + patch, x : x + patch] += base - p
            cover[y : y + patch, x : x + patch] += 1
    return _unit(drop / cover)


def _starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch positions along a side: every `stride` pixels, and one flush with the far edge, so that
    every pixel is covered."""
    starts = list(range(0, size - patch + 1, stride))
    return starts if starts[-1] == size - patch else [*starts, size - patch]


GRAD_CAM = Method("Grad-CAM", grad_cam, differentiable=True)
OCCLUSION = Method("occlusion", occlusion, differentiable=False)
METHODS: dict[str, Method] = {m.name: m for m in (GRAD_CAM, OCCLUSION)}


def head_method(head: type | object) -> Method:
    """Grad-CAM for a head that `head_module` turns into a torch module (`Head.differentiable`);
    occlusion, which needs only the head's probabilities, for every other."""
    return GRAD_CAM if getattr(head, "differentiable", False) else OCCLUSION


# ---------------------------------------------------------------------------------------------- runs


def check_explainable(run: Run) -> None:
    """Refuse (ExplainError) a run whose head reads anything besides one backbone's embedding of the
    image."""
    backbones = run.inputs.backbones
    if len(backbones) != 1:
        raise ExplainError(
            f"{run.folder}: its head reads {len(backbones)} backbones ({', '.join(backbones)}), and a heatmap "
            "follows one backbone; explain a run fitted on one (`fit --backbone NAME`)"
        )
    if run.inputs.meta:
        raise ExplainError(
            f"{run.folder}: its head also reads metadata ({', '.join(run.inputs.meta)}), whose share a heatmap "
            "cannot show; explain a run fitted without --meta"
        )


def load_explainer(
    run_dir: str | Path, *, device: str = "auto", method: str = "auto", occlusion: Occlusion = Occlusion()
) -> Explainer:
    """A run ready to explain images: its backbone loaded with the weights and options its store was
    extracted with, and its head; `method` "auto" picks the head's (`head_method`)."""
    run = load_run(run_dir)
    check_explainable(run)
    chosen = head_method(run.head) if method == "auto" else METHODS.get(method)
    if chosen is None:
        raise ExplainError(f"--method {method!r}: choose auto, {', '.join(METHODS)}")
    if chosen.differentiable and not head_method(run.head).differentiable:
        raise ExplainError(
            f"--method {chosen.name}: the run's {run.head.name} head is not a torch module, so it has no "
            "gradients; use --method occlusion (or auto)"
        )
    ((name, recorded),) = run.card["extraction"].items()
    backbone = load_backbone(name, weights_option(name, recorded, run.folder), recorded_options(recorded))
    head = head_module(run.head, len(run.classes)) if chosen.differentiable else None
    return Explainer(
        run=run,
        backbone=backbone,
        method=chosen,
        device=torch.device(resolve_device(device)),
        views=recorded.get("views") or "none",
        occlusion=occlusion,
        head=head,
    )


def explain_picture(
    explainer: Explainer, image_id: str, picture: Image.Image, *, target: str | None = None
) -> Explanation:
    """Explain an upright RGB picture for `target` (default: the run's positive class, else the class
    it predicts)."""
    pixels = explainer.backbone.preprocess.to_uint8(picture)
    proba = probabilities(explainer, pixels[None])[0]
    classes = explainer.run.classes
    positive = explainer.run.card.get("positive")
    target = target or (positive if positive in classes else classes[int(np.argmax(proba))])
    if target not in classes:
        raise ExplainError(f"target class {target!r}: the run's classes are {', '.join(classes)}")
    k = classes.index(target)
    return Explanation(
        image_id=image_id,
        image=pixels.permute(1, 2, 0).numpy().copy(),
        heat=explainer.method.heat(explainer, pixels, k).astype(np.float32),
        method=explainer.method.name,
        target=target,
        probability=float(proba[k]),
    )


def _pictures(
    paths: list[str | Path], root: str | Path | None, failed: dict[str, str]
) -> Iterator[tuple[str, Image.Image]]:
    """(image id, picture) of every readable image named by `paths` (as `predict` reads them); the
    others go to `failed` with their reason."""
    manifest, empty = read_paths(paths, root)
    failed.update(empty)
    for row, image_id in enumerate(manifest.image_id):
        try:
            picture, _ = load_image(manifest.file(row))
        except Exception as exc:  # one odd file must not lose the others (as extraction treats it)
            failed[image_id] = failure_reason(exc)
            continue
        yield image_id, picture


def explain(
    run_dir: str | Path,
    paths: list[str | Path],
    *,
    device: str = "auto",
    method: str = "auto",
    target: str | None = None,
    occlusion: Occlusion = Occlusion(),
    root: str | Path | None = None,
    failed: dict[str, str] | None = None,
) -> Iterator[Explanation]:
    """Explain image files, folders of them or a manifest CSV (its paths relative to `root`) with a run,
    one image at a time as the iterator is read (a run that cannot be explained is refused at once).
    Images that cannot be read are left out, and added to `failed` (image id -> reason) where given."""
    explainer = load_explainer(run_dir, device=device, method=method, occlusion=occlusion)
    failed = {} if failed is None else failed
    return (explain_picture(explainer, i, p, target=target) for i, p in _pictures(paths, root, failed))


def write_explanations(explanations: Iterable[Explanation], out_dir: str | Path) -> list[Path]:
    """Each explanation written as it comes to OUT_DIR/<image id>.png (`save_overlay`), so that only one
    is held at a time; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for explanation in explanations:
        path = out_dir / f"{stored_name(explanation.image_id)}.png"
        save_overlay(explanation, path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------- drawing


def overlay(explanation: Explanation, *, colormap: str = "jet", alpha: float = 0.45) -> Image.Image:
    """The picture with its heatmap blended on top and a caption on it naming the method, the class
    explained and its probability, so that a copy of the image alone still says what it shows."""
    from matplotlib import colormaps  # drawing only: explaining never needs it

    colours = colormaps[colormap](explanation.heat)[..., :3] * 255
    blended = (1 - alpha) * explanation.image.astype(np.float64) + alpha * colours
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    caption = f"{explanation.method} · {explanation.target} {explanation.probability:.2f}"
    font = ImageFont.load_default(size=max(10, picture.height // 16))
    draw = ImageDraw.Draw(picture, "RGBA")
    left, top, right, bottom = draw.textbbox((4, 3), caption, font=font)
    draw.rectangle((0, 0, right + 4, bottom + 3), fill=(0, 0, 0, 160))  # legible on any colour
    draw.text((4, 3), caption, font=font, fill=(255, 255, 255, 255))
    return picture


def save_overlay(explanation: Explanation, path: str | Path) -> None:
    """`overlay` as a PNG whose text chunks say what it shows (method, target, probability, image id),
    for tools that read the file rather than the picture."""
    info = PngInfo()
    for key, value in (
        ("method", explanation.method),
        ("target", explanation.target),
        ("probability", f"{explanation.probability:.6f}"),
        ("image_id", explanation.image_id),
    ):
        info.add_text(key, value)
    overlay(explanation).save(path, format="PNG", pnginfo=info)
