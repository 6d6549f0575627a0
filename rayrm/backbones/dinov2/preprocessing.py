"""uint8 frames -> normalised float pixels on the model's device, sized for the patch grid.

* ``options.normalize``: ``seed`` (default: x/255, then (x-0.5)/0.5 on every channel) or
  ``imagenet`` (x/255, then ImageNet mean/std);
* ``options.resolution``: ``native`` (default, docs/recipe.md#embedding: no resize; where 14 does
  not divide H or W the frame is *center-cropped* to the largest multiple of 14 - at most 13 pixels
  lost, and no invented border content, which padding would add) or ``resize`` to
  ``options.image_size`` (an int or [H, W], multiples of 14; bicubic with antialias).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from rayrm.backbones.base import check_frames, frames_tensor
from rayrm.errors import UserError

NORMALIZATIONS = {
    "seed": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
RESOLUTIONS = ("native", "resize")


def _image_size(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) for v in value)
    ):
        return int(value[0]), int(value[1])
    raise UserError(f"backbone.options.image_size must be an int or [H, W], got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """uint8 frames -> normalised float pixels on the device, sized for the patch grid."""

    patch_size: int
    normalize: str = "seed"
    resolution: str = "native"
    image_size: tuple[int, int] | None = None

    @classmethod
    def from_options(cls, options: dict, patch_size: int) -> Preprocess:
        normalize = options.get("normalize", "seed")
        resolution = options.get("resolution", "native")
        if normalize not in NORMALIZATIONS:
            raise UserError(f"options.normalize must be one of {list(NORMALIZATIONS)}")
        if resolution not in RESOLUTIONS:
            raise UserError(f"options.resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        size = None
        if resolution == "resize":
            if "image_size" not in options:
                raise UserError("options.resolution 'resize' needs options.image_size")
            size = _image_size(options["image_size"])
            if any(s <= 0 or s % patch_size for s in size):
                raise UserError(f"options.image_size {size} must be multiples of {patch_size}")
        return cls(patch_size, normalize, resolution, size)

    def __call__(self, frames: np.ndarray, device: torch.device) -> torch.Tensor:
        return self.normalise(self.host_tensor(frames).to(device))

    def host_tensor(self, frames: np.ndarray) -> torch.Tensor:
        """Checked, cropped uint8 frames as a CPU tensor sharing the array's memory."""
        check_frames(frames)
        return frames_tensor(self._crop(frames) if self.resolution == "native" else frames)

    def input_size(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the model's input for frames of ``frame_size`` after ``host_tensor``."""
        return self.image_size or tuple(frame_size)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] (on the model's device) -> normalised float [B, 3, H', W']."""
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if self.image_size is not None and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", antialias=True)
            x = x.clamp_(0.0, 1.0)  # bicubic overshoots; uint8 resizers clip the same way
        mean, std = NORMALIZATIONS[self.normalize]
        mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean_t).div_(std_t)

    def _crop(self, frames: np.ndarray) -> np.ndarray:
        """Center crop to the largest multiple of the patch size (a no-op where it divides)."""
        h, w = frames.shape[1:3]
        p = self.patch_size
        if h < p or w < p:
            raise UserError(
                f"frames of {h}x{w} pixels are smaller than one {p}x{p} patch; use "
                "options.resolution: resize with options.image_size"
            )
        top, left = (h % p) // 2, (w % p) // 2
        return frames[:, top : top + h - h % p, left : left + w - w % p]
