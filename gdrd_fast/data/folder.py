"""Identity-folder face datasets: root/<identity>/<image>, aligned crops (112x112 by convention).

Items are (image, label, index): the dataset index addresses the CRD memory banks (method.md section 2).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .images import IMAGE_EXTENSIONS, load_image


class IdentityFolderDataset(Dataset):
    """One sub-folder per identity; identities and files are sorted, so labels and indices are stable.

    image_size: resize every image to image_size x image_size (bilinear, antialias) when it differs;
    None keeps the stored size. transform: applied to the (3, H, W) tensor in [-1, 1].
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = 112,
                 transform: Callable[[Tensor], Tensor] | None = None,
                 extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"root {str(self.root)!r} is not a directory")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self.image_size, self.transform = image_size, transform
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
        image = load_image(self.root / path)
        if self.image_size is not None and image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(image[None], size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0].clamp_(-1.0, 1.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, label, index

    def index_of(self) -> dict[str, int]:
        """Relative path (as stored in `samples`, '/'-separated) -> dataset index."""
        return {Path(path).as_posix(): i for i, (path, _) in enumerate(self.samples)}
