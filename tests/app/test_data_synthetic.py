import json

import torch
import torch.nn.functional as F

from gdrd_fast.data import (IdentityFolderDataset, SyntheticFaces, degrade, load_pairs_bin, sample_pairs,
                            write_synthetic_dataset)
from gdrd_fast.data.synthetic import identity_parameters, nuisance_parameters
from gdrd_fast.eval import verify


def test_deterministic_from_seed():
    a = SyntheticFaces(3, 4, seed=7, image_size=48)
    b = SyntheticFaces(3, 4, seed=7, image_size=48)
    assert torch.equal(a.pixels, b.pixels) and a.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    c = SyntheticFaces(3, 4, seed=8, image_size=48)
    assert (a.pixels.float() - c.pixels.float()).abs().mean() > 10
    # Image i of identity k depends only on (seed, k, i): not on how many images or identities are drawn.
    more = SyntheticFaces(5, 6, seed=7, image_size=48)
    assert torch.equal(more.pixels[:4], a.pixels[:4])
    offset = SyntheticFaces(2, 4, seed=7, image_size=48, first_identity=1)
    assert torch.equal(offset.pixels, a.pixels[4:])
    assert torch.equal(nuisance_parameters(7, 1, 6)["angle"][:4], nuisance_parameters(7, 1, 4)["angle"])
    image, label, index = a[5]
    assert image.shape == (3, 48, 48) and label == 1 and index == 5 and -1 <= image.min() < image.max() <= 1


def test_named_synthetic_everywhere(tmp_path):
    ds = SyntheticFaces(2, 2, seed=1, image_size=32)
    assert "synthetic" in ds.name and all(c.startswith("synthetic_") for c in ds.classes)
    assert all(path.startswith("synthetic_") for path, _ in ds.samples)
    paths = write_synthetic_dataset(tmp_path, num_train_identities=3, images_per_identity=2,
                                    num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2,
                                    seed=5, image_size=32)
    assert all("synthetic" in p.name for p in paths.values())
    meta = json.loads(paths["metadata"].read_text())
    assert meta["synthetic"] is True and "SYNTHETIC" in meta["note"]
    folder = IdentityFolderDataset(paths["train"], image_size=None)
    assert len(folder) == 6 and folder.classes == ["synthetic_id00000", "synthetic_id00001", "synthetic_id00002"]
    # What lands on disk is exactly what the dataset renders (lossless PNG).
    assert torch.equal(folder[3][0], SyntheticFaces(3, 2, seed=5, image_size=32)[3][0])
    images, issame = load_pairs_bin(paths["pairs"])
    assert images.shape == (40, 3, 32, 32) and issame.tolist() == [True, False] * 10


def test_sample_pairs_lfw_layout():
    labels = torch.arange(40).repeat_interleave(3)
    pairs, issame = sample_pairs(labels, pairs_per_fold=6, seed=0)
    assert pairs.shape == (60, 2) and issame.tolist() == ([True] * 3 + [False] * 3) * 10
    same_label = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    assert torch.equal(same_label, issame) and (pairs[:, 0] != pairs[:, 1]).all()
    fold_ids = [set(labels[pairs[6 * f: 6 * f + 6]].flatten().tolist()) for f in range(10)]
    assert all(not fold_ids[i] & fold_ids[j] for i in range(10) for j in range(i))   # identity-disjoint folds
    assert torch.equal(sample_pairs(labels, pairs_per_fold=6, seed=0)[0], pairs)


def test_random_features_verify_at_chance():
    # 60 identities x 6 image pairs per fold: 300 same-identity pairs are mostly distinct.
    labels = SyntheticFaces(600, 4, seed=3, image_size=8).targets
    pairs, issame = sample_pairs(labels, pairs_per_fold=600, seed=3)
    features = F.normalize(torch.randn(int(labels.numel()), 128), dim=1)   # random, image-independent
    result = verify(features[pairs[:, 0]], features[pairs[:, 1]], issame)
    assert result.num_pairs == 6000 and abs(result.accuracy - 0.5) < 0.03


def test_identity_lives_in_fine_detail_that_16x16_destroys():
    # Two identities identical in every coarse parameter, differing only in texture and marks, seen
    # with the same pose/light/expression: they differ at 112 px and nearly vanish at 16x16, where a
    # different identity still stands out.
    from gdrd_fast.data.synthetic import render_faces
    base, other = identity_parameters(0, 0), identity_parameters(0, 1)
    fine_keys = ("wave_k", "wave_angle", "wave_phase", "mole_u", "mole_v", "mole_dark")
    twin = {k: other[k] if k in fine_keys else v for k, v in base.items()}
    nuisance = {k: v.repeat(3) for k, v in nuisance_parameters(0, 0, 1).items()}
    nuisance["noise"].zero_()
    ident = {k: torch.stack([base[k], twin[k], other[k]]) for k in base}
    faces = render_faces(ident, nuisance, 112).float() / 127.5 - 1
    low = degrade(faces, 16)
    hr_twin, lr_twin = (faces[0] - faces[1]).abs().mean(), (low[0] - low[1]).abs().mean()
    lr_other = (low[0] - low[2]).abs().mean()
    assert hr_twin > 0.008 and lr_twin < hr_twin / 5 and lr_other > 10 * lr_twin
