"""Checkpoint files against hostile bytes: every altered, cut or foreign file raises CorruptCheckpointError
naming the file, and nothing in it runs; writes are atomic and checksummed."""
import os
import random
import struct

import pytest
import torch

from gdrd_fast import atomic
from gdrd_fast.models import CorruptCheckpointError, load_backbone
from gdrd_fast.models.checkpoints import read_checkpoint, read_state_dict, write_checkpoint
from gdrd_fast.train import load_checkpoint, save_checkpoint
from gdrd_fast.train.checkpoint import rng_state

MARKER = 0.43713  # a float64 value the bit-flip test finds in the file


def _state():
    bank = torch.full((64, 8), MARKER, dtype=torch.float64)
    return {"step": 7, "modules": {"bank": bank, "w": torch.randn(5, 3)}, "rng": rng_state(), "note": "x"}


def _assert_corrupt(path, **kwargs):
    with pytest.raises(CorruptCheckpointError) as info:
        (read_checkpoint if kwargs else load_checkpoint)(path, **kwargs)
    message = str(info.value)
    assert str(path) in message and "corrupt" in message
    assert "weights_only" not in message and "\n" not in message
    return message


def test_round_trip_is_an_ordinary_torch_file(tmp_path):
    state = _state()
    path = save_checkpoint(state, tmp_path / "ck.pt")
    for loaded in (load_checkpoint(path), torch.load(path, weights_only=True)):  # plain torch.load reads it too
        assert loaded["step"] == 7 and loaded["note"] == "x"
        torch.testing.assert_close(loaded["modules"]["bank"], state["modules"]["bank"], rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name != "ck.pt"]  # no temporary file left


def test_one_flipped_bit_in_tensor_data_is_caught(tmp_path):
    path = save_checkpoint(_state(), tmp_path / "ck.pt")
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<d", MARKER))
    assert at > 0
    data[at + 3] ^= 0x04  # 0.43713 -> a nearby value that would load silently without the digest
    path.write_bytes(bytes(data))
    assert "SHA-256" in _assert_corrupt(path)


def test_any_flipped_byte_is_caught(tmp_path):
    good = save_checkpoint(_state(), tmp_path / "good.pt").read_bytes()
    rng = random.Random(0)
    for i, at in enumerate(sorted(rng.sample(range(len(good)), 40)) + [0, len(good) - 1]):
        data = bytearray(good)
        data[at] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{i}.pt"
        path.write_bytes(bytes(data))
        _assert_corrupt(path)


@pytest.mark.parametrize("cut", [0, 1, 100, 0.5, -1, -30, -90])
def test_truncated_and_empty_files(cut, tmp_path):
    good = save_checkpoint(_state(), tmp_path / "good.pt").read_bytes()
    end = int(cut * len(good)) if isinstance(cut, float) else (len(good) + cut if cut < 0 else cut)
    path = tmp_path / "cut.pt"
    path.write_bytes(good[:end])
    _assert_corrupt(path)
    _assert_corrupt(path, require_digest=False)  # with or without a digest to check


@pytest.mark.parametrize("content", [bytes(random.Random(1).randbytes(5000)), b"PK\x03\x04" + b"\0" * 200,
                                     b"not a checkpoint\n" * 20, b"\x80\x02}q\x00."])
def test_random_bytes_and_foreign_files(content, tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    _assert_corrupt(path)
    _assert_corrupt(path, require_digest=False)


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_code_is_refused_without_unsafe_advice(tmp_path):
    payload = Payload()
    payload.marker = tmp_path / "ran"
    path = write_checkpoint({"x": payload}, tmp_path / "evil.pt")  # a valid digest: the content is the problem
    message = _assert_corrupt(path)
    assert "posix.system" in message or "os.system" in message
    assert not payload.marker.exists()


def test_training_checkpoints_need_the_digest_weights_do_not(tmp_path):
    plain = tmp_path / "released.pt"
    torch.save({"w": torch.ones(2)}, plain)  # e.g. insightface's backbone.pth: no digest
    assert "SHA-256 record" in _assert_corrupt(plain)
    assert read_state_dict(plain)["w"].tolist() == [1.0, 1.0]


def test_weights_files_are_verified_when_they_carry_a_digest(tmp_path):
    from gdrd_fast.models import get_model

    path = write_checkpoint(get_model("r18").state_dict(), tmp_path / "student.pt")
    load_backbone(path, "r18")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="student.pt"):
        load_backbone(path, "r18")


def test_write_is_atomic_and_fsyncs_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    good = save_checkpoint(_state(), path).read_bytes()
    synced = []
    monkeypatch.setattr(atomic, "_fsync_dir", lambda folder: synced.append((folder, path.read_bytes())))
    new = save_checkpoint({"step": 8}, path)
    assert synced == [(tmp_path, new.read_bytes())]  # after the rename: the new file is in place

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(), path)
    assert path.read_bytes() == new.read_bytes() != good and sorted(tmp_path.iterdir()) == [path]
