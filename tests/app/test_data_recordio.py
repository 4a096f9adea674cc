"""insightface RecordIO without mxnet: an independent writer's file reads back, pack round-trips, bad
files name file and offset, reads are safe in DataLoader workers (fork and spawn)."""
import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gdrd_fast import cli
from gdrd_fast.data import (IdentityFolderDataset, RecordDataset, RecordFile, RecordIOError, open_dataset,
                            pack_folder, unpack_record)

MAGIC = 0xCED7230A


# ---- an independent writer, from the format description alone ------------------------------------

def _frame(payload: bytes) -> bytes:
    """dmlc RecordIO framing: magic, (cflag << 29 | length), data, zero padding to 4 bytes; a payload
    with the magic word at an aligned position is cut there into parts (cflag 1, 2.., 3)."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) // 4 * 4, 4) if payload[i:i + 4] == magic]
    pieces, start = [], 0
    for i in cuts:
        pieces.append(payload[start:i])
        start = i + 4
    pieces.append(payload[start:])
    out = b""
    for n, piece in enumerate(pieces):
        cflag = 0 if len(pieces) == 1 else (1 if n == 0 else 3 if n == len(pieces) - 1 else 2)
        out += magic + struct.pack("<I", (cflag << 29) | len(piece)) + piece
    return out + b"\0" * (-len(payload) % 4)


def _payload(label, image: bytes, id_=0, id2=0) -> bytes:
    if isinstance(label, (list, tuple)):
        return struct.pack("<IfQQ", len(label), 0.0, id_, id2) + struct.pack(f"<{len(label)}f", *label) + image
    return struct.pack("<IfQQ", 0, label, id_, id2) + image


def _write_rec(path, records: dict[int, bytes]):
    rec, idx = b"", ""
    for key, payload in records.items():
        idx += f"{key}\t{len(rec)}\n"
        rec += _frame(payload)
    path.write_bytes(rec)
    path.with_suffix(".idx").write_text(idx)
    return path


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pil_pixels(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)


def _faces(n, size=20, seed=0):
    return [np.random.default_rng(seed + i).integers(0, 256, (size, size, 3), dtype=np.uint8) for i in range(n)]


def test_independent_writer_reads_back_labels_and_pixels(tmp_path):
    faces = _faces(6)
    images = [_encode(f, "JPEG" if i % 2 else "PNG") for i, f in enumerate(faces)]
    labels = [0, 0, 1, 1, 2, 2]
    records = {0: _payload([7.0, 10.0], b"")}
    for key, (label, image) in enumerate(zip(labels, images), start=1):
        # record 3 carries its label as an array (Glint360K style); record 4's id holds the magic word at
        # payload offset 8, so the writer must split it into parts
        label_field = [float(label), 0.5] if key == 3 else float(label)
        records[key] = _payload(label_field, image, id_=MAGIC if key == 4 else key)
    for k, (a, b) in enumerate([(1, 3), (3, 5), (5, 7)]):
        records[7 + k] = _payload([float(a), float(b)], b"")
    rec = _write_rec(tmp_path / "train.rec", records)
    assert b"\x0a\x23\xd7\xce" + struct.pack("<I", (1 << 29) | 8) in rec.read_bytes()  # record 4 was split

    for ds in (RecordDataset(rec, image_size=None), open_dataset(tmp_path, image_size=None)):
        assert len(ds) == 6 and ds.targets.tolist() == labels and ds.num_classes == 3
        for i in range(6):
            image, label, index = ds[i]
            assert (label, index) == (labels[i], i)
            expected = torch.from_numpy(faces[i]).permute(2, 0, 1) if i % 2 == 0 else _pil_pixels(images[i])
            assert torch.equal(((image + 1) * 127.5).round().to(torch.uint8), expected)
    assert torch.equal(RecordDataset(rec, image_size=None, as_uint8=True)[1][0], _pil_pixels(images[1]))
    header = RecordFile(rec).header(4)
    assert header.id == MAGIC and header.label == 1.0
    assert RecordDataset(rec, image_size=8, as_uint8=True)[0][0].shape == (3, 8, 8)


def test_record0_without_range_means_every_key_is_an_image(tmp_path):
    faces = _faces(3)
    rec = _write_rec(tmp_path / "plain.rec", {k: _payload(float(2 - k), _encode(f, "PNG"))
                                              for k, f in enumerate(faces)})
    ds = open_dataset(rec, image_size=None, as_uint8=True)
    assert ds.targets.tolist() == [2, 1, 0]
    assert torch.equal(ds[2][0], torch.from_numpy(faces[2]).permute(2, 0, 1))


def _tree(root, counts: dict[str, int], size=16):
    for c, (name, n) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True)
        for i, face in enumerate(_faces(n, size, seed=10 * c)):
            Image.fromarray(face).save(root / name / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_pack_round_trips_an_identity_folder_in_insightface_layout(tmp_path):
    folder = _tree(tmp_path / "faces", {"alice": 3, "bob": 2, "carol": 4})
    assert cli.main(["data", "pack", str(folder), str(tmp_path / "out" / "train.rec"), "--no-progress"]) == 0
    rec = RecordFile(tmp_path / "out" / "train.rec")
    header, _ = unpack_record(rec.read(0))
    assert header.flag == 2 and header.label.tolist() == [10.0, 13.0]     # 9 images, then 3 identities
    assert [unpack_record(rec.read(k))[0].label.tolist() for k in (10, 11, 12)] == [[1, 4], [4, 6], [6, 10]]
    packed = open_dataset(tmp_path / "out", image_size=None, as_uint8=True)
    folder_ds = IdentityFolderDataset(folder, image_size=None, as_uint8=True)
    assert isinstance(packed, RecordDataset) and isinstance(open_dataset(folder), IdentityFolderDataset)
    assert packed.targets.tolist() == folder_ds.targets.tolist()
    for i in range(len(packed)):
        assert torch.equal(packed[i][0], folder_ds[i][0])
        assert torch.equal(packed[i][0], _pil_pixels((folder / folder_ds.samples[i][0]).read_bytes()))
    float_folder = IdentityFolderDataset(folder, image_size=None)
    assert torch.equal(open_dataset(tmp_path / "out" / "train.rec", image_size=None)[4][0], float_folder[4][0])
    (folder / "bob" / "zz.png").write_bytes(b"not a png at all")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "pack", str(folder), str(tmp_path / "bad.rec"), "--no-progress"])
    assert exit_info.value.code == 2 and not (tmp_path / "bad.rec").exists() and not (tmp_path / "bad.idx").exists()


@pytest.fixture
def packed(tmp_path):
    folder = _tree(tmp_path / "faces", {"a": 2, "b": 2})
    rec, idx = pack_folder(folder, tmp_path / "train.rec", progress=False)
    return rec, idx, [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]


def test_bad_magic_names_file_and_offset(packed):
    rec, _, offsets = packed
    data = bytearray(rec.read_bytes())
    data[offsets[2]] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"train\.rec: bad magic 0x[0-9a-f]+ at byte offset {offsets[2]}\b"):
        RecordDataset(rec)


def test_truncated_record_names_file_and_offset(packed):
    rec, _, offsets = packed
    rec.write_bytes(rec.read_bytes()[:offsets[4] + 20])      # record 4 (the last image) loses its end
    with pytest.raises(RecordIOError, match=rf"train\.rec: truncated record at byte offset {offsets[4]}\b"):
        RecordDataset(rec)


def test_idx_offset_past_the_end_names_file_and_offset(packed):
    rec, idx, _ = packed
    size = rec.stat().st_size
    idx.write_text(idx.read_text() + f"99\t{size + 64}\n")
    with pytest.raises(RecordIOError, match=rf"train\.rec: byte offset {size + 64} from train\.idx is past the end"):
        RecordDataset(rec)
    idx.write_text("0\tzero\n")
    with pytest.raises(RecordIOError, match=r"train\.idx:1: expected"):
        RecordDataset(rec)
    idx.unlink()
    with pytest.raises(RecordIOError, match="index file not found"):
        open_dataset(rec)


def test_record_that_is_not_an_image_names_file_and_offset(tmp_path):
    face = _encode(_faces(1)[0], "PNG")
    rec = _write_rec(tmp_path / "x.rec", {0: _payload([3.0, 4.0], b""), 1: _payload(0.0, face),
                                          2: _payload(0.0, b"\x89PNG but broken"), 3: _payload([1.0, 3.0], b"")})
    offset = RecordFile(rec).offset_of(2)
    ds = RecordDataset(rec, image_size=None)
    assert ds[0][0].shape == (3, 20, 20)
    with pytest.raises(RecordIOError, match=rf"x\.rec: record 2 at byte offset {offset} is not an image"):
        ds[1]
    with pytest.raises(ValueError, match="is a file but not a .rec"):
        open_dataset(tmp_path / "x.idx")
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(tmp_path / "nothing")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_the_same_items(packed, context):
    rec, _, _ = packed
    ds = RecordDataset(rec, image_size=None, as_uint8=True)
    ds[0]  # the parent maps the file first: workers must not reuse its mapping blindly
    serial = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=1, num_workers=2, multiprocessing_context=context, shuffle=False)
    for (image, label, index), (want_image, want_label, want_index) in zip(loader, serial):
        assert torch.equal(image[0], want_image) and int(label) == want_label and int(index) == want_index
