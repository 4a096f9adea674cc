"""Low-resolution degradation: an aligned face down to r x r, then back up to the network's input size.

[paper] r in {8, 16, 32}, bilinear. [choice] antialias=True by default: a camera that sees a face at
16x16 integrates light over each pixel, it does not point-sample the 112x112 crop; without antialias,
bilinear downsampling by 7 keeps aliased fine detail that a real low-resolution face does not have.
Upsampling uses the same mode (antialias has no effect when enlarging).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

RESOLUTIONS = (8, 16, 32)
MODES = ("bilinear", "bicubic", "area", "nearest")
_ANTIALIAS_MODES = ("bilinear", "bicubic")


def degrade(image: Tensor, resolution: int, size: int | None = None, mode: str = "bilinear",
            antialias: bool = True) -> Tensor:
    """Down to `resolution` x `resolution`, then up to `size` x `size` (default: the input's size).

    image: (3, H, W) or (N, 3, H, W) float, square. Returns the same rank and dtype, clamped to the
    input's value range [-1, 1] (bicubic overshoots).
    """
    if not isinstance(image, Tensor) or not image.is_floating_point():
        raise TypeError("image must be a floating-point torch.Tensor")
    if image.dim() not in (3, 4) or image.shape[-1] != image.shape[-2]:
        raise ValueError(f"image must be (3, H, W) or (N, 3, H, W) with H == W, got {tuple(image.shape)}")
    height = image.shape[-1]
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= height:
        raise ValueError(f"resolution must be an int in [1, {height}], got {resolution!r}")
    size = height if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if antialias and mode not in _ANTIALIAS_MODES:
        raise ValueError(f"antialias=True needs mode in {_ANTIALIAS_MODES}, got mode={mode!r}")
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    corners = {} if mode in ("area", "nearest") else {"align_corners": False}
    low = F.interpolate(batch, size=(resolution, resolution), mode=mode, antialias=antialias, **corners)
    out = F.interpolate(low, size=(size, size), mode=mode, **corners).clamp_(-1.0, 1.0)
    return out if image.dim() == 4 else out.squeeze(0)
