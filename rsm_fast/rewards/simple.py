"""Weight-free image rewards: JPEG (in)compressibility (black box) and two differentiable ones.

JPEG follows DDPO (kvablack/ddpo-pytorch, ``ddpo_pytorch/rewards.py``: ``jpeg_incompressibility``
saves each image with PIL ``format="JPEG", quality=95`` and scores ``buffer.tell() / 1000``,
i.e. kilobytes of 1000 bytes; ``jpeg_compressibility`` is its negative).
"""
from __future__ import annotations

import io

import torch
from torch import Tensor

from .base import RewardError, check_images, out_dtype, to_pil

JPEG_QUALITY = 95      # ddpo_pytorch/rewards.py: image.save(buffer, format="JPEG", quality=95)
BYTES_PER_KB = 1000    # ddpo_pytorch/rewards.py: sizes = [buffer.tell() / 1000 ...]


def jpeg_kilobytes(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """Size in KB (1000 bytes) of each image saved as PIL JPEG at ``quality`` -> ``[B]`` float32."""
    sizes = []
    for im in to_pil(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / BYTES_PER_KB)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegReward:
    """``-KB`` (compressibility, spec ``jpeg``) or ``+KB`` (``jpeg-incompressibility``). Black box."""

    differentiable = False

    def __init__(self, incompressible: bool = False, quality: int = JPEG_QUALITY):
        self.incompressible, self.quality = incompressible, int(quality)
        self.name = "jpeg-incompressibility" if incompressible else "jpeg"

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        check_images(images, self.name)
        kb = jpeg_kilobytes(images, self.quality)
        return kb if self.incompressible else -kb


class BrightnessReward:
    """Mean pixel value over channels and pixels (in [0, 1]); gradient ``1 / (C H W)`` everywhere."""

    name = "brightness"
    differentiable = True

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        check_images(images, self.name)
        return images.to(out_dtype(images)).mean(dim=(1, 2, 3))


class ColorReward:
    """``-mean_pixels ||pixel - target||^2``: 0 for an image of exactly the target colour.

    ``target`` has one value per channel (``color:1,0,0`` is pure red for RGB; ``color:0.5`` a
    mid grey for one-channel images).
    """

    differentiable = True

    def __init__(self, target):
        self.target = tuple(float(v) for v in target)
        if not self.target or not all(0.0 <= v <= 1.0 for v in self.target):
            raise RewardError(f"reward 'color' needs 1 or 3 values in [0, 1], got {self.target}")
        self.name = "color:" + ",".join(f"{v:g}" for v in self.target)

    def __call__(self, images: Tensor, prompts=None, metadata=None) -> Tensor:
        check_images(images, self.name, channels=(len(self.target),))
        x = images.to(out_dtype(images))
        c = torch.tensor(self.target, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return -((x - c) ** 2).sum(dim=1).mean(dim=(1, 2))


def parse_color(arg: str | None) -> ColorReward:
    if not arg:
        raise RewardError("reward 'color' needs a colour: 'color:R,G,B' (values in [0, 1]) or 'color:V'")
    try:
        vals = [float(v) for v in arg.split(",")]
    except ValueError:
        raise RewardError(f"reward 'color:{arg}': expected comma-separated numbers in [0, 1]") from None
    if len(vals) not in (1, 3):
        raise RewardError(f"reward 'color:{arg}': expected 1 or 3 values, got {len(vals)}")
    return ColorReward(vals)
