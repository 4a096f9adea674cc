import math
import os
import pickle

import pytest
import torch

from gdrd_fast.data import (CrossResolutionDataset, CrossResolutionViews, IdentityFolderDataset, UnsafePickleError,
                            degrade, encode_png, from_uint8, load_pairs_bin, read_pairs_bin, read_split_file,
                            restricted_loads, to_uint8, write_pairs_bin)


def _quantised(*shape):
    """Random images already on the 8-bit grid, so PNG round trips are exact."""
    return from_uint8(torch.randint(0, 256, shape, dtype=torch.uint8))


# ---- degrade -------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [8, 16, 32])
def test_degrade_shapes(r):
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    assert degrade(x, r).shape == (2, 3, 112, 112)
    assert degrade(x[0], r).shape == (3, 112, 112)
    assert degrade(x, r, size=64).shape == (2, 3, 64, 64)
    y = degrade(x.double(), r, mode="bicubic")
    assert y.dtype == torch.float64 and y.min() >= -1 and y.max() <= 1
    # What the student sees is exactly r x r worth of information: degrading again changes nothing much.
    once = degrade(x, r)
    low = torch.nn.functional.interpolate(once, size=(r, r), mode="bilinear", antialias=True)
    assert low.shape == (2, 3, r, r)


def test_16x16_destroys_fine_detail_keeps_coarse_geometry():
    axis = torch.arange(112, dtype=torch.float64)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    coarse = torch.exp(-((xx - 40) ** 2 + (yy - 70) ** 2) / (2 * 14.0 ** 2))       # a blob ~30 px wide
    fine = torch.sin(2 * math.pi * (xx + 0.5 * yy) / 4.0)                            # 4 px wavelength
    image = (0.6 * coarse + 0.3 * fine - 0.2).expand(3, 112, 112).contiguous()
    out = degrade(image, 16)[0]

    def share(component):   # projection of the output onto a zero-mean, unit component
        c = component - component.mean()
        return float((out - out.mean()).flatten() @ c.flatten() / (c.flatten() @ c.flatten()))

    assert share(coarse) / 0.6 > 0.85        # the blob keeps most of its amplitude and place
    assert abs(share(fine) / 0.3) < 0.02     # the texture is gone
    peak = (out == out.max()).nonzero()[0]
    assert abs(int(peak[0]) - 70) <= 4 and abs(int(peak[1]) - 40) <= 4
    # A 10 px texture is above 32x32's Nyquist wavelength (7 px) but below 16x16's (14 px).
    texture = torch.sin(2 * math.pi * xx / 10.0).expand(3, 112, 112).contiguous()

    def kept(r):
        return float((degrade(texture, r)[0] * texture[0]).mean() / (texture[0] ** 2).mean())

    assert kept(32) > 0.3 and kept(16) < 0.06 and kept(8) < 0.01


def test_degrade_bad_arguments():
    x = torch.zeros(3, 112, 112)
    for bad in (0, 113, 16.0, True):
        with pytest.raises(ValueError, match="resolution"):
            degrade(x, bad)
    with pytest.raises(ValueError, match="mode"):
        degrade(x, 16, mode="lanczos")
    with pytest.raises(ValueError, match="antialias"):
        degrade(x, 16, mode="area")
    with pytest.raises(ValueError, match="H == W"):
        degrade(torch.zeros(3, 112, 96), 16)
    with pytest.raises(TypeError):
        degrade(torch.zeros(3, 8, 8, dtype=torch.uint8), 4)


def test_views_flip_hr_and_lr_identically():
    image = torch.rand(3, 32, 32) * 2 - 1
    always = CrossResolutionViews(resolution=8, flip_probability=1.0)
    hr, lr = always(image)
    assert torch.equal(hr, image.flip(-1)) and torch.equal(lr, degrade(image.flip(-1), 8))
    hr, lr = CrossResolutionViews(resolution=8, flip_probability=0.0)(image)
    assert torch.equal(hr, image)
    views = CrossResolutionViews(resolution=8)
    flips = 0
    for _ in range(40):
        hr, lr = views(image)
        assert torch.equal(lr, degrade(hr, 8))
        flips += torch.equal(hr, image.flip(-1))
    assert 5 < flips < 35
    with pytest.raises(ValueError, match="flip_probability"):
        CrossResolutionViews(flip_probability=1.5)


def test_cross_resolution_dataset():
    class Faces(torch.utils.data.Dataset):
        targets = torch.tensor([3, 1])

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.full((3, 16, 16), float(i)) * torch.linspace(-1, 1, 16), int(self.targets[i]), i

    ds = CrossResolutionDataset(Faces(), CrossResolutionViews(resolution=4, flip_probability=1.0))
    hr, lr, label, index = ds[1]
    assert len(ds) == 2 and ds.targets.tolist() == [3, 1] and (label, index) == (1, 1)
    assert torch.equal(hr, Faces()[1][0].flip(-1)) and torch.equal(lr, degrade(hr, 4))


# ---- identity folders and splits ------------------------------------------------------------------

def _write_tree(root, sizes, hw=12):
    from PIL import Image
    images = {}
    for ident, count in sizes.items():
        (root / ident).mkdir(parents=True)
        for k in range(count):
            x = _quantised(3, hw, hw)
            (root / ident / f"{k:02d}.png").write_bytes(encode_png(x))
            images[f"{ident}/{k:02d}.png"] = x
    Image.new("L", (hw, hw), color=255).save(root / "bob" / "grey.jpg")       # grey JPEG -> RGB
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return images


def test_identity_folder_dataset(tmp_path):
    images = _write_tree(tmp_path, {"bob": 2, "alice": 3})
    ds = IdentityFolderDataset(tmp_path, image_size=None)
    assert ds.classes == ["alice", "bob"] and len(ds) == 6
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        image, label, index = ds[i]
        assert index == i and label == ds.targets[i] and image.shape == (3, 12, 12)
        path = ds.samples[i][0]
        if path in images:
            assert torch.equal(image, images[path])     # RGB order and [-1, 1] scaling kept exactly
    grey, _, _ = ds[ds.index_of()["bob/grey.jpg"]]
    assert torch.allclose(grey, torch.ones(3, 12, 12), atol=0.02)
    resized = IdentityFolderDataset(tmp_path, image_size=7, transform=lambda x: x.flip(-1))
    assert resized[0][0].shape == (3, 7, 7)
    with pytest.raises(ValueError, match="no identity folders"):
        IdentityFolderDataset(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        IdentityFolderDataset(tmp_path / "missing")


def test_split_file(tmp_path):
    _write_tree(tmp_path / "faces", {"alice": 2, "bob": 2})
    ds = IdentityFolderDataset(tmp_path / "faces", image_size=None)
    split_path = tmp_path / "split.txt"
    split_path.write_text("# comment\n\ngallery alice/00.png\ngallery 3 9\nprobe  alice/01.png 0\n"
                          "train 0\ntrain 4\ntest bob/grey.jpg\n")
    split = read_split_file(split_path)
    idx, labels = split.resolve("gallery", ds)
    assert idx.tolist() == [0, 3] and labels.tolist() == [0, 9]   # an explicit label wins
    assert split.resolve("probe", ds)[0].tolist() == [1]
    assert split.resolve("train", ds)[1].tolist() == [0, 1]
    assert split.resolve("test", ds)[0].tolist() == [ds.index_of()["bob/grey.jpg"]]
    for text, match in (("query 1\n", "part"), ("train 1 x\n", "label"), ("train\n", "expected"),
                        ("# nothing\n", "no entries"), ("train -3\n", "index")):
        split_path.write_text(text)
        with pytest.raises(ValueError, match=match):
            read_split_file(split_path)
    split_path.write_text("probe carol/00.png\ngallery 99\n")
    split = read_split_file(split_path)
    with pytest.raises(ValueError, match="carol"):
        split.resolve("probe", ds)
    with pytest.raises(ValueError, match="outside"):
        split.resolve("gallery", ds)
    with pytest.raises(ValueError, match="no 'train'"):
        split.resolve("train", ds)


# ---- insightface .bin -----------------------------------------------------------------------------

def test_pairs_bin_round_trip(tmp_path):
    images, issame = _quantised(6, 3, 16, 16), torch.tensor([True, False, True])
    path = tmp_path / "pairs.bin"
    write_pairs_bin(path, images, issame)
    loaded, same = load_pairs_bin(path)
    assert torch.equal(loaded, images) and torch.equal(same, issame)
    encoded, flags = read_pairs_bin(path)
    assert len(encoded) == 6 and flags == [True, False, True]
    # The layouts real files come in: Python 2 str (protocol 2) and Python 3 bytes at protocols 0..5.
    for protocol in range(6):
        (tmp_path / "p.bin").write_bytes(pickle.dumps((tuple(encoded), flags), protocol=protocol))
        assert read_pairs_bin(tmp_path / "p.bin") == (encoded, flags)
    py2 = b"\x80\x02]q\x00(U\x03abcq\x01U\x02deq\x02e]q\x03\x88a\x86q\x04."   # ([str 'abc', str 'de'], [True])
    assert restricted_loads(py2) == ([b"abc", b"de"], [True])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    for protocol in (0, 2, 4):
        payload = pickle.dumps(([b"x", _Exploit(marker)], [True]), protocol=protocol)
        (tmp_path / "evil.bin").write_bytes(payload)
        with pytest.raises(UnsafePickleError, match="system"):
            read_pairs_bin(tmp_path / "evil.bin")
        assert not marker.exists()
    for other, what in (({"a": b"x"}, "dict"), ([1.5], "float"), ([b"x", "text"], "str"), ([b"x", 3], "int")):
        with pytest.raises(UnsafePickleError, match=what):
            restricted_loads(pickle.dumps(other, protocol=4))
    with pytest.raises(UnsafePickleError, match="encode"):   # the one accepted global, misused
        restricted_loads(b"c_codecs\nencode\n(I1\nS'latin1'\ntR.")


def test_pairs_bin_rejects_bad_structure_and_writes_nothing(tmp_path):
    path = tmp_path / "bad.bin"
    for obj, match in (([b"a"], "pair"), (([b"a", b"b", b"c"], [True]), "2 per pair"),
                       (([b"a", b"b"], [b"no"]), "list of bool"), (([], []), "at least 1")):
        path.write_bytes(pickle.dumps(obj, protocol=4))
        with pytest.raises(ValueError, match=match):
            read_pairs_bin(path)
    target = tmp_path / "new.bin"
    with pytest.raises(ValueError, match="2 per pair"):
        write_pairs_bin(target, _quantised(3, 3, 4, 4), [True, False])
    with pytest.raises(TypeError):
        write_pairs_bin(target, ["not bytes", b"x"], [True])
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.bin"]


def test_uint8_conversions():
    x = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    f = from_uint8(x)
    assert f.min() >= -1 and f.max() <= 1 and torch.equal(to_uint8(f), x)
    assert torch.equal(from_uint8(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([-1.0, 1.0]))
