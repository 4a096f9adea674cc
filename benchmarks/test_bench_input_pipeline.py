"""The training input pipeline: what one DataLoader worker does per image, and the views the trainer
makes of each batch on its device.

Worker (the whole per-worker pipeline: read + decode + the item's transform + collate), one process,
one torch thread, num_workers=0, so images/s is per core. 112x112 JPEG faces (quality 95, like
insightface's packs), the same bytes in every provider:
  eager              identity folder, PIL decode to float per image (the trainer before RecordIO)
  per-image-degrade  identity folder, PIL, flip + degrade to 16x16 and back per image (CrossResolutionDataset)
  folder-uint8       identity folder, torchvision decode, uint8 items
  recordio           train.rec through its .idx (mmap), torchvision decode, uint8 items
Views (on the training device, here whatever bench_device() finds): a collated batch to float, one flip
per sample shared by HR and LR, down to 16x16 and back: per image (eager) against batched (make_views).
The speed-up columns of the report are against `eager` in the same run.
"""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .harness import bench_device, device_name, versions

IMAGES, BATCH, RESOLUTION = 512, 64, 16
WORKER_PROVIDERS = ("eager", "per-image-degrade", "folder-uint8", "recordio")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """An identity folder of 112x112 JPEGs and the same files packed into train.rec."""
    from gdrd_fast.data import SyntheticFaces, pack_folder
    root = tmp_path_factory.mktemp("input_pipeline")
    faces = SyntheticFaces(IMAGES // 16, 16, seed=0, image_size=112)
    for (rel, _), pixels in zip(faces.samples, faces.pixels):
        path = root / "folder" / rel.replace(".png", ".jpg")
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=95)
        path.write_bytes(buf.getvalue())
    pack_folder(root / "folder", root / "rec" / "train.rec", progress=False)
    return root


def worker(provider: str, root):
    """A zero-argument callable that loads every image once, as one worker would (items collated)."""
    from gdrd_fast.data import (
        CrossResolutionDataset,
        CrossResolutionViews,
        IdentityFolderDataset,
        RecordDataset,
    )
    if provider == "per-image-degrade":
        dataset = CrossResolutionDataset(IdentityFolderDataset(root / "folder"), CrossResolutionViews(RESOLUTION))
    elif provider == "recordio":
        dataset = RecordDataset(root / "rec" / "train.rec", as_uint8=True)
    else:
        dataset = IdentityFolderDataset(root / "folder", as_uint8=provider == "folder-uint8")
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=False, num_workers=0)
    return lambda: list(loader)


def views(provider: str, device: str):
    """A zero-argument callable making (HR, LR) views of one collated uint8 batch on `device`."""
    from gdrd_fast.data import CrossResolutionViews, from_uint8
    from gdrd_fast.train.loop import make_views
    from gdrd_fast.train.runtime import Runtime
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (BATCH, 3, 112, 112), dtype=torch.uint8, generator=gen),
             torch.zeros(BATCH, dtype=torch.long), torch.arange(BATCH))
    runtime = Runtime(torch.device(device))
    per_image = CrossResolutionViews(RESOLUTION)

    def run():
        if provider == "eager":
            pairs = [per_image(from_uint8(image).to(device)) for image in batch[0]]
            out = torch.stack([hr for hr, _ in pairs]), torch.stack([lr for _, lr in pairs])
        else:
            v = make_views(batch, runtime, RESOLUTION, flip=True)
            out = v.hr, v.lr
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out
    return run


def _measure(benchmark, run, group: str, provider: str, images: int, device: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one worker = one core
    try:
        run()
        benchmark.group = group
        benchmark.extra_info.update(op=group, provider=provider, size=f"{images} images", device=device_name(device),
                                    images=images, cpu_threads=1, **versions())
        benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
        if benchmark.stats is not None:  # None under --benchmark-disable (the functions run once, untimed)
            benchmark.extra_info["images_per_s"] = images / benchmark.stats.stats.median
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("provider", WORKER_PROVIDERS)
def test_worker_pipeline(benchmark, faces, provider):
    batches = worker(provider, faces)()
    assert sum(len(b[1]) for b in batches) == IMAGES
    _measure(benchmark, worker(provider, faces), f"input pipeline per worker, {IMAGES} 112x112 JPEG", provider,
             IMAGES, "cpu")


@pytest.mark.parametrize("provider", ["eager", "batched"])
def test_views_on_device(benchmark, provider):
    device = bench_device()
    hr, lr = views(provider, device)()
    assert hr.shape == lr.shape == (BATCH, 3, 112, 112) and lr.dtype == torch.float32
    _measure(benchmark, views(provider, device), f"HR + {RESOLUTION}x{RESOLUTION} views of a batch of {BATCH}",
             provider, BATCH, device)
