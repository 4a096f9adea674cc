"""Identity-folder face datasets: root/<identity>/<image>, aligned crops (112x112 by convention).

Items are (image, label, index): the dataset index addresses the CRD memory banks (docs/ops/crd.md).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, MISMATCH_RULES, check_training_image, decode_image, decode_image_uint8


class IdentityFolderDataset(Dataset):
    """One sub-folder per identity; identities and files are sorted, so labels and indices are stable.

    image_size: resize every image to image_size x image_size (bilinear, antialias) when it differs;
    None keeps the stored size. transform: applied to the (3, H, W) tensor in [-1, 1].
    as_uint8: items hold uint8 (3, H, W) RGB decoded by torchvision (the trainer converts them on its
    device), and no transform is allowed. mismatch: 'resize' converts and resizes an image that is not RGB
    image_size x image_size, 'refuse' raises ValueError naming it (images.check_training_image).
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = 112,
                 transform: Callable[[Tensor], Tensor] | None = None,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS, as_uint8: bool = False, mismatch: str = "resize"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root {str(self.root)!r} is not a directory")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        if as_uint8 and transform is not None:
            raise ValueError("as_uint8=True returns raw pixels: a transform needs as_uint8=False")
        if mismatch not in MISMATCH_RULES:
            raise ValueError(f"mismatch must be one of {MISMATCH_RULES}, got {mismatch!r}")
        self.image_size, self.transform, self.as_uint8, self.mismatch = image_size, transform, as_uint8, mismatch
        extensions = tuple(e.lower() for e in extensions)
        self.classes: list[str] = []
        self.samples: list[tuple[str, int]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in extensions)
            if files:
                label = len(self.classes)
                self.classes.append(folder.name)
                self.samples.extend((str(f.relative_to(self.root)), label) for f in files)
        if not self.samples:
            raise ValueError(f"root {str(self.root)!r} has no identity folders with images {extensions}")
        self.targets = torch.tensor([label for _, label in self.samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        data = (self.root / path).read_bytes()
        check_training_image(data, str(self.root / path), self.image_size, self.mismatch)
        if self.as_uint8:
            return resize_uint8(decode_image_uint8(data, str(self.root / path)), self.image_size), label, index
        image = decode_image(data)
        if self.image_size is not None and image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(image[None], size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp_(-1.0, 1.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, index

    def index_of(self) -> dict[str, int]:
        return index_by_path(self.samples)


def index_by_path(samples: list[tuple[str, int]]) -> dict[str, int]:
    """Relative path ('/'-separated) -> dataset index, for datasets that list (path, label) samples."""
    return {Path(path).as_posix(): i for i, (path, _) in enumerate(samples)}


def resize_uint8(pixels: Tensor, size: int | None) -> Tensor:
    """uint8 (3, H, W) resized to size x size (bilinear, antialias, rounded) when it differs."""
    if size is None or pixels.shape[-2:] == (size, size):
        return pixels
    resized = F.interpolate(pixels[None].float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class ImageListDataset(Dataset):
    """Images at the given paths as uint8 (3, image_size, image_size) RGB: items (image, index).

    For evaluation layouts that list files rather than identity folders (TinyFace's flat folders).
    """

    def __init__(self, paths: list[str | os.PathLike], image_size: int | None = 112):
        self.paths, self.image_size = [Path(p) for p in paths], image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path = self.paths[index]
        return resize_uint8(decode_image_uint8(path.read_bytes(), str(path)), self.image_size), index


def image_files(folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files directly in `folder` and below it, sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a directory")
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions),
                  key=lambda p: p.relative_to(folder).as_posix())
