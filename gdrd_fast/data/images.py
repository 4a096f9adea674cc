"""Pixel conventions of aligned faces: RGB, float in [-1, 1] = (x/255 - 0.5)/0.5 (insightface)."""
from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def from_uint8(pixels: Tensor) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1]."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    return pixels.float().div_(127.5).sub_(1.0)


def to_uint8(image: Tensor) -> Tensor:
    """float in [-1, 1] (..., 3, H, W) -> uint8, rounded and clipped."""
    if not image.is_floating_point():
        raise TypeError(f"image must be a float tensor, got {image.dtype}")
    return ((image.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def decode_image(data: bytes) -> Tensor:
    """JPEG/PNG/BMP bytes -> (3, H, W) float32 in [-1, 1], RGB (grey images are expanded)."""
    from PIL import Image  # pillow comes with matplotlib; imported lazily so core ops never need it

    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(rgb.height, rgb.width, 3).permute(2, 0, 1).contiguous()
    return from_uint8(pixels)


def decode_image_uint8(data: bytes, where: str = "image") -> Tensor:
    """Encoded image -> uint8 (3, H, W) RGB through torchvision's decoders (libjpeg-turbo, libpng) where
    torchvision is installed, else PIL (also for the formats torchvision does not read). `where` names
    the image in the error for non-images."""
    tv = _torchvision_decoder()
    if tv is not None:
        try:
            return tv(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except (RuntimeError, ValueError):
            pass
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{where} is not an image ({len(data)} bytes: {exc})") from None


MISMATCH_RULES = ("refuse", "resize")


def check_training_image(data: bytes, where: str, size: int | None, mismatch: str) -> None:
    """Under mismatch='refuse', ValueError naming the image (`where`) when it is not RGB size x size; read
    from the file's header only. 'resize' accepts it (the reader converts and resizes it)."""
    if mismatch == "resize":
        return
    if mismatch not in MISMATCH_RULES:
        raise ValueError(f"mismatch must be one of {MISMATCH_RULES}, got {mismatch!r}")
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as img:
            mode, (width, height) = img.mode, img.size
    except (UnidentifiedImageError, OSError, ValueError):
        return  # not an image at all: the decoder reports it, naming the image
    problems = ([] if mode == "RGB" else [f"mode {mode}"]) + \
        ([] if size is None or (width, height) == (size, size) else [f"{width}x{height}"])
    if problems:
        expected = "RGB" + (f" {size}x{size} (data.image_size)" if size is not None else "")
        raise ValueError(f"{where} is {' and '.join(problems)}, not {expected}: convert the training set, or set "
                         "data.mismatch=resize to convert and resize such images (bilinear, antialiased)")


@functools.cache
def _torchvision_decoder():
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    # torchvision 0.29 announces that its decoders move to torchcodec; until then they are the fastest here
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                            DeprecationWarning)
    return functools.partial(decode_image, mode=ImageReadMode.RGB)


def load_image(path: str | os.PathLike) -> Tensor:
    return decode_image(Path(path).read_bytes())


def encode_png(image: Tensor) -> bytes:
    """(3, H, W) float in [-1, 1] -> lossless PNG bytes (so a round trip is exact up to 8-bit rounding)."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    hwc = to_uint8(image).permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(hwc, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file (gdrd_fast.atomic)."""
    write_bytes(path, data)
