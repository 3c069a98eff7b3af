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
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = [
    "VIEWS",
    "Preprocess",
    "apply_views",
]


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize`, centre-crop `crop`, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """An RGB picture as a (3, crop, crop) uint8 tensor."""
        mode = InterpolationMode(self.interpolation)
        img = TF.resize(img, self.resize, interpolation=mode, antialias=True)
        img = TF.center_crop(img, [self.crop, self.crop])
        return TF.pil_to_tensor(img)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 to normalised float32 on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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
