"""Faults in what a run reads and writes: corrupt labels, a .rec truncated in place under a reader,
workers' errors, images of the wrong size or mode, stale temporary files, the csv rows a resume rewrites."""
import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gdrd_fast import atomic
from gdrd_fast.data import RecordDataset, RecordIOError, open_dataset, pack_folder, write_synthetic_dataset
from gdrd_fast.data.workers import original_error
from gdrd_fast.models.checkpoints import write_checkpoint
from gdrd_fast.train import load_config
from gdrd_fast.train.validation import drop_rows_after


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A pack of 3 identities x 4 faces at 32 px: record 0 declares identities 13..15, images are keys 1..12."""
    root = tmp_path_factory.mktemp("pack")
    data = write_synthetic_dataset(root / "data", num_train_identities=3, images_per_identity=4,
                                   num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2,
                                   image_size=32)
    rec, _ = pack_folder(data["train"], root / "train.rec", progress=False)
    return rec


def _copy(rec, folder):
    folder.mkdir()
    for suffix in (".rec", ".idx"):
        (folder / f"train{suffix}").write_bytes(rec.with_suffix(suffix).read_bytes())
    return folder / "train.rec"


def _set_label(rec, key: int, value: float) -> None:
    """Overwrite the IRHeader label of image record `key` in place (its flag is 0: a scalar label)."""
    offset = dict(line.split("\t") for line in rec.with_suffix(".idx").read_text().split("\n") if line)[str(key)]
    with open(rec, "r+b") as f:
        f.seek(int(offset) + 8 + 4)
        f.write(struct.pack("<f", value))


@pytest.mark.parametrize("label, rule", [(1.5, "integers in \\[0, 3\\)"), (131072.0, "in \\[0, 3\\)"),
                                         (3.7e19, "in \\[0, 3\\)"), (float("nan"), "integers"),
                                         (-1.0, "in \\[0, 3\\)")])
def test_corrupt_labels_are_refused_naming_file_and_record(packed, tmp_path, label, rule):
    rec = _copy(packed, tmp_path / "bad")
    _set_label(rec, 7, label)
    with pytest.raises(RecordIOError, match=f"{rec}: record 7 \\(byte offset \\d+\\) has label .*{rule}"):
        RecordDataset(rec)
    good = RecordDataset(packed)
    assert sorted(set(good.targets.tolist())) == [0, 1, 2]


def test_labels_without_a_declared_range_must_still_be_exact_integers(tmp_path):
    from gdrd_fast.data import RecordWriter, pack_record
    png = (tmp_path / "x.png")
    Image.new("RGB", (8, 8)).save(png)
    with RecordWriter(tmp_path / "flat.rec") as w:  # no record-0 header: every key is an image
        for key, label in enumerate([0.0, 1.0, 2.0 ** 25]):
            w.write(key, pack_record(label, png.read_bytes()))
    with pytest.raises(RecordIOError, match="record 2 .* label 33554432.0.*2\\*\\*24"):
        RecordDataset(tmp_path / "flat.rec", image_size=8)


TRUNCATE = textwrap.dedent("""
    import sys
    import torch
    from torch.utils.data import DataLoader
    from gdrd_fast.data import RecordDataset, RecordIOError
    from gdrd_fast.data.workers import original_error
    rec, workers = sys.argv[1], int(sys.argv[2])
    data = RecordDataset(rec, image_size=32, as_uint8=True)
    assert data[0][0].shape == (3, 32, 32)
    size = data.file.size
    with open(rec, "r+b") as f:  # what `cp other.rec train.rec` does to a file a job has open
        f.truncate(size // 3)
    try:
        if workers:
            list(DataLoader(data, batch_size=4, num_workers=workers))
        else:
            data[len(data) - 1]
    except Exception as exc:
        exc = original_error(exc)
        print(type(exc).__name__, exc, sep=": ")
        sys.exit(3)
    sys.exit(0)
""")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_rec_truncated_in_place_under_a_reader_is_one_line_not_sigbus(packed, tmp_path, workers):
    rec = _copy(packed, tmp_path / "live")
    done = subprocess.run([sys.executable, "-c", TRUNCATE, str(rec), str(workers)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])  # -7 was SIGBUS
    line = done.stdout.strip()
    assert line.count("\n") == 0 and line.startswith(f"RecordIOError: {rec}: the record file changed while this "
                                                     "job reads it"), line


def test_a_rec_deleted_or_replaced_under_a_reader_is_named(packed, tmp_path):
    rec = _copy(packed, tmp_path / "live")
    data = RecordDataset(rec, image_size=32)
    data[0]
    replacement = tmp_path / "other.rec"
    replacement.write_bytes(rec.read_bytes())
    os.replace(replacement, rec)  # same bytes, another file
    with pytest.raises(RecordIOError, match="changed while this job reads it .*another file"):
        data[1]
    rec.unlink()
    with pytest.raises(RecordIOError, match=f"{rec}: the record file was deleted"):
        data[1]


def _corrupt_last_image(rec) -> int:
    """Overwrite the first image bytes of the last image record with zeros; returns its key."""
    data = RecordDataset(rec)
    key = int(data.keys[-1])
    offset = int(data.file.offset_of(key))
    with open(rec, "r+b") as f:
        f.seek(offset + 8 + 24)
        f.write(b"\0" * 16)
    return key


def test_a_worker_error_comes_back_with_its_class_and_message(packed, tmp_path):
    rec = _copy(packed, tmp_path / "bad")
    key = _corrupt_last_image(rec)
    data = RecordDataset(rec, image_size=32)
    with pytest.raises(RecordIOError) as direct:
        data[len(data) - 1]
    with pytest.raises(RecordIOError) as wrapped:
        list(DataLoader(data, batch_size=len(data), num_workers=2))
    assert "Caught RecordIOError" in str(wrapped.value)  # what torch gives
    clean = original_error(wrapped.value)
    def address_free(text):  # PIL's message names an object by its address
        return re.sub("0x[0-9a-f]+", "0x", text)

    assert type(clean) is RecordIOError and address_free(str(clean)) == address_free(str(direct.value))
    assert f"record {key}" in str(clean) and "\n" not in str(clean)
    plain = ValueError("not from a worker")
    assert original_error(plain) is plain


def test_cli_reports_a_worker_error_as_one_line(packed, tmp_path):
    import fault_cases as fc
    rec = _copy(packed, tmp_path / "bad")
    key = _corrupt_last_image(rec)
    inputs = {"rec": rec, "pairs": tmp_path / "none.bin", "head": tmp_path / "none.pt"}
    done = fc.run(fc.overrides(inputs, tmp_path / "run", "variant=baseline", "data.num_workers=2", "eval.val_targets=[]",
                               "data.mismatch=resize", "stage1.optim.steps=3", "stage2.optim.steps=3"), timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gdrd-fast train: error: {rec}: record {key} at byte offset") and "Caught" not in last


def _faces(root, sizes_modes):
    for i, (size, mode) in enumerate(sizes_modes):
        folder = root / f"id{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, color=(90 if mode == "L" else (90, 20, 200))).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("size, mode, found", [((100, 80), "RGB", "100x80"), ((32, 32), "L", "mode L"),
                                               ((32, 32), "RGBA", "mode RGBA")])
def test_training_images_of_another_size_or_mode_are_refused_or_resized(tmp_path, size, mode, found):
    root = _faces(tmp_path / "faces", [((32, 32), "RGB"), (size, mode), ((32, 32), "RGB")])
    odd = root / "id1" / "1.png"
    data = open_dataset(root, 32, as_uint8=True, mismatch="refuse")
    with pytest.raises(ValueError, match=f"{odd} is {found}, not RGB 32x32 \\(data.image_size\\).*data.mismatch"):
        data[2]  # id0/0.png, id0/2.png, id1/1.png
    image = open_dataset(root, 32, as_uint8=True, mismatch="resize")[2][0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    rec, _ = pack_folder(root, tmp_path / "pack" / "train.rec", progress=False)
    with pytest.raises(RecordIOError, match=f"{rec}: record 3 at byte offset \\d+ is {found}"):
        open_dataset(rec, 32, mismatch="refuse")[2]
    # a set whose first image is already wrong fails when it is opened, before any training
    with pytest.raises(ValueError, match="not RGB 16x16"):
        open_dataset(root, 16, mismatch="refuse")


def test_the_mismatch_rule_is_a_checked_config_key():
    assert load_config("paper").data.mismatch == "refuse"
    assert load_config("paper", ["data.mismatch=resize"]).data.mismatch == "resize"
    with pytest.raises(ValueError, match="data.mismatch must be one of"):
        load_config("paper", ["data.mismatch=stretch"])


def test_stale_temporary_files_are_removed_at_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = atomic._HOST
    stale = [tmp_path / f".stage2.pt.tmp-{host}-{dead}-0a1b2c3d", tmp_path / ".stage2.pt.k3j4h5g6.tmp",
             tmp_path / f".stage1.pt.tmp-{host}-{dead}-99aa"]
    live = [tmp_path / f".stage2.pt.tmp-{host}-{os.getpid()}-0a1b", tmp_path / f".stage2.pt.tmp-otherhost-{dead}-0a1b"]
    for path in stale + live:
        path.write_bytes(b"half a checkpoint")
    write_checkpoint({"x": torch.ones(2)}, tmp_path / "stage2.pt")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"stage2.pt", stale[2].name} | {p.name for p in live}
    assert atomic.remove_stale(tmp_path) == [stale[2]]  # a run's start sweeps every target
    assert {p.name for p in tmp_path.iterdir()} == {"stage2.pt"} | {p.name for p in live}


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "stage1.pt"
    write_checkpoint({"step": 1}, target)
    before = target.read_bytes()

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise OSError(28, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    real = atomic._RecordingFile.__init__
    monkeypatch.setattr(atomic._RecordingFile, "__init__", lambda self, f: real(self, Full(f)))
    with pytest.raises(atomic.WriteError, match=f"could not write {target}: the disk is full; any earlier stage1.pt "
                                                "is left as it was"):
        write_checkpoint({"w": torch.zeros(10_000)}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["stage1.pt"]


def test_rows_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("step,stage,term,value\n1,stage1,gen,1.0\n2,stage1,gen,0.9\n3,stage1,gen,0.8\n"
                    "1,stage2,cls,5.0\n2,stage2,cls,4.0\n1,probe,acc,0.5\n3,stage2,c")
    stages = ["stage1", "stage2"]
    assert drop_rows_after(path, stages, "stage2", 1) == 2  # stage 2's step 2, and the row a kill cut short
    assert path.read_text().splitlines()[1:] == ["1,stage1,gen,1.0", "2,stage1,gen,0.9", "3,stage1,gen,0.8",
                                                 "1,stage2,cls,5.0", "1,probe,acc,0.5"]
    assert drop_rows_after(path, stages, "stage1", 2) == 2
    assert drop_rows_after(path, stages, None, 0) == 2  # a fresh run: only other stages' rows stay
    assert path.read_text().splitlines() == ["step,stage,term,value", "1,probe,acc,0.5"]
    assert drop_rows_after(tmp_path / "none.csv", stages, None, 0) == 0
