"""The demo's data: the synthetic face set (or a real identity folder + insightface .bin), its verification
pairs and, for the synthetic set, the labelled test images of the linear probe."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data import IdentityFolderDataset, SyntheticFaces, load_pairs_bin, sample_pairs
from ..data.images import atomic_write_bytes
from .config import DemoConfig

log = logging.getLogger("gdrd_fast.demo")
# the rendered pixels of a synthetic set, by its arguments: rendering is most of a cell's start-up on CPU,
# and every process of a grid (main, denoiser, cells, analyze) draws the same sets
_RENDERED: dict[tuple, torch.Tensor] = {}
RENDER_VERSION = 1  # bump when gdrd_fast.data.synthetic draws differently: older cached renders are redrawn


def data_cache_dir(grid: str | Path) -> Path:
    return Path(grid) / "data"


def synthetic_faces(num_identities: int, images_per_identity: int, seed: int, image_size: int,
                    first_identity: int = 0, cache_dir: str | Path | None = None) -> SyntheticFaces:
    """SyntheticFaces(...), its pixels rendered once per process and, with cache_dir, once per grid: read
    back from cache_dir/synthetic-*.pt when a process of the grid has rendered them (the same uint8 pixels)."""
    key = (RENDER_VERSION, num_identities, images_per_identity, seed, image_size, first_identity)
    pixels = _RENDERED.get(key)
    path = None if cache_dir is None else Path(cache_dir) / (
        f"synthetic-v{RENDER_VERSION}-seed{seed}-from{first_identity}-{num_identities}x{images_per_identity}"
        f"-{image_size}px.pt")
    if pixels is None and path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if tuple(saved["key"]) == key:
                pixels = saved["pixels"]
        except Exception as exc:  # a damaged file: drawn again below, and rewritten
            log.warning("unreadable data cache %s (%s): rendering again", path, exc)
    if pixels is None:
        faces = SyntheticFaces(num_identities, images_per_identity, seed, image_size, first_identity)
        pixels = faces.pixels
        if path is not None:
            buffer = io.BytesIO()
            torch.save({"key": list(key), "pixels": pixels}, buffer)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buffer.getvalue())
    _RENDERED[key] = pixels
    return SyntheticFaces(num_identities, images_per_identity, seed, image_size, first_identity, pixels=pixels)

SYNTHETIC_NOTE = ("SYNTHETIC data: face-like images drawn by gdrd_fast.data.synthetic, not real faces; "
                  "numbers are not comparable with LFW results.")


def load_data(config: DemoConfig, train_root: str | None = None, pairs: str | None = None,
              cache_dir: str | Path | None = None):
    """(train dataset, pair images (2N, 3, S, S), issame (N,), data name, synthetic?). The synthetic sets
    are rendered once per process, and once per grid with cache_dir (synthetic_faces)."""
    if (train_root is None) != (pairs is None):
        raise ValueError("a real run needs both train_root (identity folders) and pairs (an insightface .bin)")
    size = config.image_size
    if train_root is None:
        d = config.data
        train = synthetic_faces(d.train_identities, d.images_per_identity, config.seed, size, 0, cache_dir)
        test = synthetic_faces(d.test_identities, d.test_images_per_identity, config.seed, size,
                               d.train_identities, cache_dir)
        index, issame = sample_pairs(test.targets, pairs_per_fold=d.pairs_per_fold, seed=config.seed)
        images = test.images()[index.flatten()]
        name = (f"SYNTHETIC faces (seed {config.seed}; {d.train_identities} train identities x "
                f"{d.images_per_identity}, {len(issame)} pairs over {d.test_identities} unseen identities)")
        return train, images, issame, name, True
    train = IdentityFolderDataset(train_root, size)
    images, issame = load_pairs_bin(pairs)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(-1, 1)
    return train, images, issame, f"real data: {train_root} ({len(train)} images) + {pairs}", False


def load_cell_data(config: DemoConfig, train_root: str | None, pairs: str | None,
                   cache_dir: str | Path | None = None) -> dict:
    """load_data as a dict, with the probe's labelled test images when the data is synthetic."""
    train_set, pair_images, issame, name, synthetic = load_data(config, train_root, pairs, cache_dir)
    data = {"train": train_set, "pair_images": pair_images, "issame": issame, "name": name,
            "synthetic": synthetic, "probe_images": None, "probe_labels": None}
    if synthetic:  # the unseen test identities, every image: the probe's set
        d = config.data
        test = synthetic_faces(d.test_identities, d.test_images_per_identity, config.seed, config.image_size,
                               d.train_identities, cache_dir)
        data["probe_images"], data["probe_labels"] = test.images(), test.targets
    return data


def data_note(data: dict) -> str:
    return SYNTHETIC_NOTE if data["synthetic"] else "real data supplied by the user"
