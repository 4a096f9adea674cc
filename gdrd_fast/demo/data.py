"""The demo's data: the synthetic face set (or a real identity folder + insightface .bin), its verification
pairs and, for the synthetic set, the labelled test images of the linear probe."""
from __future__ import annotations

import torch.nn.functional as F

from ..data import IdentityFolderDataset, SyntheticFaces, load_pairs_bin, sample_pairs
from .config import DemoConfig

SYNTHETIC_NOTE = ("SYNTHETIC data: face-like images drawn by gdrd_fast.data.synthetic, not real faces; "
                  "numbers are not comparable with LFW results.")


def load_data(config: DemoConfig, train_root: str | None = None, pairs: str | None = None):
    """(train dataset, pair images (2N, 3, S, S), issame (N,), data name, synthetic?)."""
    if (train_root is None) != (pairs is None):
        raise ValueError("a real run needs both train_root (identity folders) and pairs (an insightface .bin)")
    size = config.image_size
    if train_root is None:
        d = config.data
        train = SyntheticFaces(d.train_identities, d.images_per_identity, config.seed, size)
        test = SyntheticFaces(d.test_identities, d.test_images_per_identity, config.seed, size,
                              first_identity=d.train_identities)
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


def load_cell_data(config: DemoConfig, train_root: str | None, pairs: str | None) -> dict:
    """load_data as a dict, with the probe's labelled test images when the data is synthetic."""
    train_set, pair_images, issame, name, synthetic = load_data(config, train_root, pairs)
    data = {"train": train_set, "pair_images": pair_images, "issame": issame, "name": name,
            "synthetic": synthetic, "probe_images": None, "probe_labels": None}
    if synthetic:  # the unseen test identities, every image: the probe's set
        d = config.data
        test = SyntheticFaces(d.test_identities, d.test_images_per_identity, config.seed, config.image_size,
                              first_identity=d.train_identities)
        data["probe_images"], data["probe_labels"] = test.images(), test.targets
    return data


def data_note(data: dict) -> str:
    return SYNTHETIC_NOTE if data["synthetic"] else "real data supplied by the user"
