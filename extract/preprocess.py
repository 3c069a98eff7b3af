"""Preprocessing that follows the weights, and test-time-augmentation views.

A backbone's input size, resize, mean and std come from its weights' own configuration (torchvision's
`weights.transforms()`, or the published recipe for weights from elsewhere), never from a constant:
inception_v3 takes 299 px, EfficientNet-Lite0 normalises as (x - 127) / 128.

The work is split so that decoding happens once per image: `to_uint8` (resize + centre crop, in the
data-loading workers, cheap to send between processes) and `normalize` (on the model's device, per
batch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = [
    "CROP_MODES",
    "VIEWS",
    "Preprocess",
    "apply_views",
]


CROP_MODES = ("center", "squash", "border")
"""timm's evaluation crops (`timm.data.transforms_imagenet_eval`), which its weights' configs name."""


@dataclass(frozen=True)
class Preprocess:
    """Resize to `resize`, centre-crop `crop`, scale to [0, 1], normalise.

    `crop_mode` says how the picture meets `resize`, as timm's evaluation transform does: `center`
    resizes the shorter side (torchvision's recipe too), `squash` both sides (the aspect ratio is not
    kept), `border` the longer side, and pads with the mean colour where the crop is larger.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    """crop / resize as the weights' own config gives it (timm, OpenCLIP), which `resize` was computed
    from; None for recipes that give `resize` itself (torchvision's)."""
    crop_mode: str = "center"

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """An RGB picture as a (3, crop, crop) uint8 tensor (Pillow resizes: `extract --decode pil`)."""
        mode = InterpolationMode(self.interpolation)
        img = TF.resize(img, self.resized_size(img.height, img.width), interpolation=mode, antialias=True)
        padding = self.border_padding(img.height, img.width)
        if padding:
            img = TF.pad(img, padding, fill=self.fill)
        img = TF.center_crop(img, [self.crop, self.crop])
        return TF.pil_to_tensor(img)

    def tensor_to_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """The same recipe as `to_uint8` as tensor operations on the batch's device (`extract --decode
        torch`): (B, 3, H, W) uint8 pictures of one size to (B, 3, crop, crop) uint8. torch's antialiased
        resize is not Pillow's to the last bit (docs/feature-store.md has the difference)."""
        height, width = batch.shape[-2:]
        mode = InterpolationMode(self.interpolation)
        batch = F2.resize(batch, self.resized_size(height, width), interpolation=mode, antialias=True)
        padding = self.border_padding(*batch.shape[-2:])
        if padding:
            batch = F2.pad(batch, padding, fill=list(self.fill))
        return F2.center_crop(batch, [self.crop, self.crop])

    def resized_size(self, height: int, width: int) -> int | list[int]:
        """The size a picture of `height` x `width` is resized to before the crop, as torchvision's
        resize takes it (an int: the shorter side, the other in proportion)."""
        if self.crop_mode == "squash":
            return [self.resize, self.resize]
        if self.crop_mode == "border":
            ratio = max(height, width) / self.resize
            return [round(height / ratio), round(width / ratio)]
        return self.resize

    def border_padding(self, height: int, width: int) -> list[int] | None:
        """`border` mode: the (left, top, right, bottom) padding that centres a resized picture smaller
        than the crop in it (timm's CenterCropOrPad); None when nothing is padded."""
        dx, dy = max(self.crop - width, 0), max(self.crop - height, 0)
        if self.crop_mode != "border" or not (dx or dy):
            return None
        return [dx // 2, dy // 2, (dx + 1) // 2, (dy + 1) // 2]

    @property
    def fill(self) -> tuple[int, int, int]:
        """The mean colour in 0-255, what `border` pads with."""
        return tuple(round(255 * v) for v in self.mean)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 to normalised float32 on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def as_dict(self) -> dict:
        """The recipe as JSON values. A recipe that gives `resize` itself (crop_pct None: always a
        centre crop) leaves out the crop keys, so that its identity is the one recorded before they
        existed."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.crop_pct is None:
            del values["crop_pct"], values["crop_mode"]
        return values


def _rot(k: int, flip: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def view(x: torch.Tensor) -> torch.Tensor:
        x = torch.flip(x, dims=(-1,)) if flip else x
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    return view


VIEWS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [_rot(0, False)],
    "flip": [_rot(0, False), _rot(0, True)],
    # the dihedral group of the square: dermoscopy has no up or down
    "d8": [_rot(k, flip) for flip in (False, True) for k in range(4)],
}
"""Test-time-augmentation view sets by name; the first view is always the image itself."""


def apply_views(batch: torch.Tensor, tta: str) -> torch.Tensor:
    """(B, 3, H, W) to (V * B, 3, H, W), view-major, for one forward pass over all views."""
    return torch.cat([view(batch) for view in VIEWS[tta]], dim=0)
