"""Face embeddings for evaluation, insightface style: emb(x) + emb(flip(x)), then L2-normalise."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


@torch.no_grad()
def extract_embeddings(model: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 128,
                       flip: bool = True, transform: Callable[[Tensor], Tensor] | None = None,
                       device: torch.device | str | None = None, progress: bool = True,
                       desc: str = "embeddings") -> Tensor:
    """L2-normalised float32 embeddings (N, D) on the CPU.

    images: (N, 3, H, W) in [-1, 1]; transform (e.g. degrade at 16x16) is applied per batch before the
    model, on the device. With flip=True the embedding is model(x) + model(flip(x)), summed BEFORE the
    normalisation (insightface eval/verification.py). The caller puts the model in eval mode.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        device = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), images.device)
    out = []
    bar = tqdm(total=images.shape[0], desc=desc, unit="img", dynamic_ncols=True, disable=not progress, leave=False)
    for batch in images.split(batch_size):
        bar.update(batch.shape[0])
        batch = batch.to(device, non_blocking=True)
        if transform is not None:
            batch = transform(batch)
        emb = model(batch).float()
        if flip:
            emb = emb + model(batch.flip(-1)).float()
        out.append(F.normalize(emb, dim=1).cpu())
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def embed_dataset(model: Callable[[Tensor], Tensor], dataset: Dataset, batch_size: int = 128, flip: bool = True,
                  transform: Callable[[Tensor], Tensor] | None = None, device: torch.device | str | None = None,
                  num_workers: int = 0, progress: bool = True, desc: str = "embeddings") -> Tensor:
    """extract_embeddings over a Dataset streamed in batches (a 150k-image gallery never sits in memory).

    Items are an image or a tuple starting with one: uint8 (3, H, W) (converted to [-1, 1] on the
    device) or float in [-1, 1], all of one size.
    """
    from ..data import from_uint8
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if device is None:
        device = next((p.device for p in getattr(model, "parameters", lambda: iter(()))()), torch.device("cpu"))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    out = []
    with tqdm(total=len(dataset), desc=desc, unit="img", dynamic_ncols=True, disable=not progress, leave=False) as bar:
        for batch in loader:
            images = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = from_uint8(images)
            out.append(extract_embeddings(model, images, batch_size=batch_size, flip=flip, transform=transform,
                                          device=device, progress=False))
            bar.update(images.shape[0])
    if not out:
        raise ValueError("dataset is empty")
    return torch.cat(out)
