"""The two views GDRD trains on: the HR face for the teacher, its degraded copy for the student.

Horizontal flip is drawn once per sample and applied before degrading, so both views are flipped
identically (docs/method/training.md).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .degrade import degrade


class CrossResolutionViews:
    """Callable image (3, H, W) -> (hr, lr): one random horizontal flip shared by both views."""

    def __init__(self, resolution: int = 16, flip_probability: float = 0.5, mode: str = "bilinear",
                 antialias: bool = True):
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability!r}")
        self.resolution, self.flip_probability = resolution, flip_probability
        self.mode, self.antialias = mode, antialias

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if float(torch.rand((), generator=generator)) < self.flip_probability:
            image = image.flip(-1)
        return image, degrade(image, self.resolution, mode=self.mode, antialias=self.antialias)

    def __repr__(self) -> str:
        return (f"CrossResolutionViews(resolution={self.resolution}, flip_probability={self.flip_probability}, "
                f"mode={self.mode!r}, antialias={self.antialias})")


class CrossResolutionDataset(Dataset):
    """Wraps a dataset of (image, label, index) into (hr, lr, label, index) with CrossResolutionViews.

    The flip uses torch's global generator, which DataLoader seeds per worker.
    """

    def __init__(self, dataset: Dataset, views: CrossResolutionViews):
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def targets(self) -> torch.Tensor:
        return self.dataset.targets

    def __getitem__(self, i: int):
        image, label, index = self.dataset[i]
        hr, lr = self.views(image)
        return hr, lr, label, index
