"""insightface's packed training sets (train.rec + train.idx) read and written without mxnet.

The format is mxnet's indexed RecordIO (dmlc-core recordio) with insightface's conventions on top:

* A record on disk: uint32 magic 0xced7230a, uint32 lrecord, then the payload, zero-padded to a
  multiple of 4 bytes. lrecord holds the payload length in its low 29 bits and a continuation flag
  in its upper 3: 0 = a whole record; 1, 2, 3 = first, middle, last part of a record that was split
  where its payload held the magic word at a 4-byte-aligned position (the writer drops that word, a
  reader puts it back between the parts). All words are little-endian.
* The .idx beside the .rec: one text line per record, "key<TAB>byte offset of its magic".
* A payload: the IRHeader, struct 'IfQQ' = (flag uint32, label float32, id uint64, id2 uint64),
  then, when flag > 0, `flag` float32 labels (the header's label field is then 0), then the bytes of
  an encoded image.
* insightface: record 0 carries flag > 0 and label[0:2] = (first identity record, end of identity
  records); the image records are keys 1 .. label[0] - 1, each labelled with its identity (a float,
  or the first element of a label array). Records label[0] .. label[1] - 1 hold, per identity, the
  range [start, end) of its image keys. When record 0 has flag 0, every key of the .idx is an image.

Readers map the .rec with mmap, opened lazily in the process that reads (DataLoader workers under
fork or spawn, torchrun ranks), and index it only through the .idx.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..atomic import remove_stale, temp_name
from .folder import IdentityFolderDataset, resize_uint8
from .images import MISMATCH_RULES, check_training_image, decode_image_uint8

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_WORDS = struct.Struct("<II")          # magic, lrecord
IR_HEADER = struct.Struct("<IfQQ")      # flag, label, id, id2: 24 bytes, no padding
MAX_PAYLOAD = 1 << 29


class RecordIOError(ValueError):
    """A .rec / .idx that does not follow the format; the message names the file and the byte offset."""


class IRHeader(NamedTuple):
    flag: int
    label: float | np.ndarray   # a float, or the float32 label array when flag > 0
    id: int
    id2: int


def pack_record(label: float | Iterable[float], image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """One payload: IRHeader + labels + image bytes (mxnet.recordio.pack's layout)."""
    if isinstance(label, (int, float, np.floating, np.integer)):
        return IR_HEADER.pack(0, float(label), id, id2) + image
    labels = np.asarray(list(label), dtype="<f4")
    if labels.size == 0:
        raise ValueError("a label array must hold at least one value")
    return IR_HEADER.pack(labels.size, 0.0, id, id2) + labels.tobytes() + image


def unpack_record(payload: bytes, where: str = "record") -> tuple[IRHeader, bytes]:
    """(IRHeader, image bytes) of one payload; `where` names the record in errors."""
    if len(payload) < IR_HEADER.size:
        raise RecordIOError(f"{where}: payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload)
    rest = memoryview(payload)[IR_HEADER.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"{where}: IRHeader announces {flag} labels but only {len(rest)} bytes follow")
        label = np.frombuffer(rest[:4 * flag], dtype="<f4").copy()
        rest = rest[4 * flag:]
    return IRHeader(flag, label, id_, id2), bytes(rest)


def first_label(header: IRHeader) -> float:
    """insightface's identity label: the float, or the first element of a label array."""
    return float(header.label[0]) if header.flag > 0 else float(header.label)


class RecordWriter:
    """Writes an indexed .rec + .idx pair the way mxnet's MXIndexedRecordIO does; both files appear
    atomically on close() (they are written beside the targets, then renamed)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        for p in (self.rec_path, self.idx_path):
            remove_stale(p.parent, p.name)
        self._tmp = [temp_name(p) for p in (self.rec_path, self.idx_path)]
        self._rec, self._idx = open(self._tmp[0], "wb"), open(self._tmp[1], "w")
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> None:
        if key in self._keys:
            raise ValueError(f"key {key} was already written to {self.rec_path}")
        if len(payload) >= MAX_PAYLOAD:
            raise ValueError(f"a record holds less than 2**29 bytes, got {len(payload)}")
        self._keys.add(key)
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        # split where the magic word sits at an aligned position, so a reader that lost its place
        # can find the next record by scanning for the magic (dmlc-core's rule)
        start, parts = 0, []
        for i in range(0, len(payload) - len(payload) % 4, 4):
            if payload[i:i + 4] == _MAGIC_BYTES:
                parts.append((payload[start:i], 1 if start == 0 else 2))
                start = i + 4
        parts.append((payload[start:], 3 if parts else 0))
        for data, cflag in parts:
            self._rec.write(_WORDS.pack(MAGIC, (cflag << 29) | len(data)) + data)
        self._rec.write(b"\0" * (-len(payload) % 4))  # middle parts are whole words: only the end pads

    def close(self) -> None:
        if self._rec.closed:
            return
        self._rec.close()
        self._idx.close()
        os.replace(self._tmp[0], self.rec_path)
        os.replace(self._tmp[1], self.idx_path)

    def abort(self) -> None:
        self._rec.close()
        self._idx.close()
        for tmp in self._tmp:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, size, modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def read_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of a .idx, both int64, in file order."""
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise RecordIOError(f"{idx_path}: index file not found (a .rec needs its .idx beside it)")
    data = idx_path.read_bytes()
    # fast path for what mxnet writes ("key<TAB>offset" lines, nothing else): one vectorised parse
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if data and data.count(b"\t") == lines and b" " not in data:
        try:
            numbers = np.array(data.split(), dtype=np.int64)
        except (ValueError, OverflowError):
            numbers = None
        if numbers is not None and len(numbers) == 2 * lines and (numbers[1::2] >= 0).all():
            return numbers[0::2].copy(), numbers[1::2].copy()
    keys, offsets = [], []
    for number, line in enumerate(data.decode(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2 or int(fields[1]) < 0:
                raise ValueError
            keys.append(int(fields[0]))
            offsets.append(int(fields[1]))
        except ValueError:
            raise RecordIOError(f"{idx_path}:{number}: expected '<key>\\t<byte offset>', got {line!r}") from None
    if not keys:
        raise RecordIOError(f"{idx_path}: the index is empty")
    return np.array(keys, np.int64), np.array(offsets, np.int64)


class RecordFile:
    """Random access to the records of a .rec through its .idx. Picklable: the mmap is (re)opened
    lazily in whichever process reads, so DataLoader workers (fork or spawn) and torchrun ranks
    each get their own mapping."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        if not self.rec_path.is_file():
            raise RecordIOError(f"{self.rec_path}: record file not found")
        self.keys, self.offsets = read_index(self.idx_path)
        stat = self.rec_path.stat()
        self.size, self._identity = stat.st_size, _identity(stat)
        order = np.argsort(self.keys, kind="stable")
        self._sorted_keys, self._sorted_pos = self.keys[order], order
        dup = self._sorted_keys[1:] == self._sorted_keys[:-1]
        if dup.any():
            raise RecordIOError(f"{self.idx_path}: key {int(self._sorted_keys[1:][dup][0])} appears twice")
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        self.check_offsets(self.offsets)

    # --- process-local mapping ---------------------------------------------------------------------
    def _open(self) -> None:
        if self._pid != os.getpid():
            self._mm = self._fd = None  # a parent's: never closed here, the parent owns them
            self._pid = os.getpid()
        if self._fd is None:
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def _map(self) -> mmap.mmap:
        """The whole file mapped, for the vectorised scans at open (offsets, labels), right after its
        size was read; single records are read with pread (read_at), which a truncation cannot crash."""
        self._open()
        if self._mm is None and self.size:
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        return self._mm

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None, "_fd": None, "_pid": None}

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._mm is not None:
                self._mm.close()
            if self._fd is not None:
                os.close(self._fd)
        self._mm = self._fd = None

    def check_unchanged(self) -> None:
        """RecordIOError naming the .rec if it was deleted, replaced, truncated or rewritten since it was
        opened (`cp other.rec train.rec` under a running job): a reader must not mix two files."""
        try:
            now = _identity(os.stat(self.rec_path))
        except FileNotFoundError:
            raise RecordIOError(f"{self.rec_path}: the record file was deleted while this job reads it") from None
        if now != self._identity:
            raise RecordIOError(f"{self.rec_path}: the record file changed while this job reads it ({self.size} "
                                f"bytes when opened, {now[2]} now{', another file' if now[:2] != self._identity[:2] else ''}"
                                "): a training set must stay as it is until the job ends; restart it")

    def _pread(self, length: int, offset: int, start: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            self.check_unchanged()
            raise RecordIOError(f"{self.rec_path}: {length} bytes at byte offset {offset} (record starting at "
                                f"{start}) could not be read: the file ends early")
        return data

    # --- validation ----------------------------------------------------------------------------------
    def check_offsets(self, offsets: np.ndarray) -> None:
        """Every record's 8-byte head at `offsets` lies inside the file, starts with the magic, and its
        first part fits in the file: one vectorised pass; the bad record at the smallest offset raises
        (a truncated file reports the record it cut, not the ones after it)."""
        inside = offsets <= self.size - _WORDS.size
        words = np.zeros((len(offsets), 2), np.int64)
        words[inside] = self._words(offsets[inside])
        bad_magic = inside & (words[:, 0] != MAGIC)
        end = offsets + _WORDS.size + (words[:, 1] & _LENGTH_MASK)
        short = inside & ~bad_magic & (end > self.size)
        bad = ~inside | bad_magic | short
        if not bad.any():
            return
        i = int(np.flatnonzero(bad)[np.argmin(offsets[bad])])
        off = int(offsets[i])
        if not inside[i]:
            what = "past the end of" if off >= self.size else "in the last 8 bytes of"
            raise RecordIOError(f"{self.rec_path}: byte offset {off} from {self.idx_path.name} is {what} the "
                                f"file ({self.size} bytes): truncated file or wrong index")
        if bad_magic[i]:
            raise RecordIOError(f"{self.rec_path}: bad magic 0x{int(words[i, 0]):08x} at byte offset {off} "
                                f"(expected 0x{MAGIC:08x})")
        raise RecordIOError(f"{self.rec_path}: truncated record at byte offset {off}: it needs {int(end[i]) - off} "
                            f"bytes, the file ends {self.size - off} bytes later")

    def _bytes_at(self, offsets: np.ndarray, width: int) -> np.ndarray:
        """(len(offsets), width) uint8: the bytes at each offset (all inside the file), gathered in
        chunks so the index arrays stay small for millions of records."""
        buf = np.frombuffer(self._map(), dtype=np.uint8) if self.size else np.empty(0, np.uint8)
        out = np.empty((len(offsets), width), np.uint8)
        step = np.arange(width)
        for s in range(0, len(offsets), 1 << 18):
            out[s:s + (1 << 18)] = buf[offsets[s:s + (1 << 18), None] + step]
        return out

    def _words(self, offsets: np.ndarray) -> np.ndarray:
        """(n, 2) int64: the (magic, lrecord) words at each offset."""
        return self._bytes_at(offsets, 8).view("<u4").astype(np.int64)

    # --- reading -------------------------------------------------------------------------------------
    def _positions(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.searchsorted(self._sorted_keys, keys).clip(max=len(self._sorted_keys) - 1)
        return pos, self._sorted_keys[pos] == keys

    def has_keys(self, keys: np.ndarray) -> np.ndarray:
        return self._positions(np.asarray(keys, np.int64))[1]

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        pos, found = self._positions(np.asarray(keys, np.int64))
        if not found.all():
            raise KeyError(f"key {int(np.asarray(keys)[~found][0])} is not in {self.idx_path}")
        return self.offsets[self._sorted_pos[pos]]

    def offset_of(self, key: int) -> int:
        return int(self.offsets_of(np.array([key]))[0])

    def __contains__(self, key: int) -> bool:
        return bool(self.has_keys(np.array([key]))[0])

    def read_at(self, offset: int) -> bytes:
        """The payload of the record starting at byte `offset` (split parts joined with the magic)."""
        self.check_unchanged()
        self._open()
        start, parts = offset, []
        while True:
            if offset > self.size - _WORDS.size:
                raise RecordIOError(f"{self.rec_path}: truncated record at byte offset {start}: the file ends at "
                                    f"{self.size} inside the record starting there")
            magic, lrec = _WORDS.unpack(self._pread(_WORDS.size, offset, start))
            if magic != MAGIC:
                raise RecordIOError(f"{self.rec_path}: bad magic 0x{magic:08x} at byte offset {offset} "
                                    f"(expected 0x{MAGIC:08x}; record starting at {start})")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            body = offset + _WORDS.size
            if body + length > self.size:
                raise RecordIOError(f"{self.rec_path}: truncated record at byte offset {offset}: {length} bytes "
                                    f"announced, {self.size - body} left in the file")
            if cflag not in ((0, 1) if not parts else (2, 3)):
                raise RecordIOError(f"{self.rec_path}: continuation flag {cflag} at byte offset {offset} out of "
                                    f"sequence (record starting at {start})")
            parts.append(self._pread(length, body, start))
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)
            offset = body + length + (-length % 4)

    def read(self, key: int) -> bytes:
        return self.read_at(self.offset_of(key))

    def header(self, key: int) -> IRHeader:
        offset = self.offset_of(key)
        return unpack_record(self.read_at(offset), f"{self.rec_path}: record {key} at byte offset {offset}")[0]


class RecordDataset(Dataset):
    """insightface's MXFaceDataset semantics on a .rec + .idx: items (image, label, index).

    image: uint8 (3, H, W) RGB when as_uint8 (the trainer converts it on its device; a quarter of the
    bytes through collate and pinning), else float32 in [-1, 1] like IdentityFolderDataset. Images of
    another size (or mode) are resized to image_size (bilinear, antialias) and converted to RGB under
    mismatch='resize', refused with a ValueError naming the record under 'refuse'; image_size=None
    keeps the stored size.

    Labels are checked at open: every one an integer, and inside the identity range that record 0
    declares (below 2**24, where float32 labels stop being exact, when it declares none).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None,
                 image_size: int | None = 112, as_uint8: bool = False, mismatch: str = "resize"):
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        if mismatch not in MISMATCH_RULES:
            raise ValueError(f"mismatch must be one of {MISMATCH_RULES}, got {mismatch!r}")
        self.file = RecordFile(rec_path, idx_path)
        self.image_size, self.as_uint8, self.mismatch = image_size, as_uint8, mismatch
        rec = self.file
        head = rec.header(0) if 0 in rec else None
        declared = None  # the number of identities record 0 declares
        if head is not None and head.flag > 0:
            first_identity = int(head.label[0])
            keys = np.arange(1, first_identity, dtype=np.int64)
            if len(keys) == 0 or not rec.has_keys(keys).all():
                raise RecordIOError(f"{rec.rec_path}: record 0 (byte offset {rec.offset_of(0)}) gives image keys "
                                    f"1..{first_identity - 1}, which {rec.idx_path.name} does not all hold")
            if head.flag >= 2 and head.label[1] > head.label[0]:
                declared = int(head.label[1] - head.label[0])
        else:
            keys = np.sort(rec.keys)
        self.keys = keys
        self._offsets = rec.offsets_of(keys)
        self.targets = torch.from_numpy(self._labels(declared))
        self.num_classes = int(self.targets.max()) + 1

    def _labels(self, declared: int | None) -> np.ndarray:
        """Every image's identity label straight from the headers, vectorised over whole records; split
        records (rare) are read one by one."""
        rec, offsets = self.file, self._offsets
        words = rec._words(offsets)
        length, cflag = words[:, 1] & _LENGTH_MASK, words[:, 1] >> 29
        simple = (cflag == 0) & (length >= IR_HEADER.size)
        labels = np.empty(len(offsets), np.float64)
        head = rec._bytes_at(offsets[simple] + 8, 8)
        flag = head[:, 0:4].copy().view("<u4").ravel()
        label = head[:, 4:8].copy().view("<f4").ravel().astype(np.float64)
        arrays = flag > 0
        if arrays.any():   # the label is the first element of the array after the header
            ok = length[simple][arrays] >= IR_HEADER.size + 4
            if not ok.all():
                off = int(offsets[simple][arrays][~ok][0])
                raise RecordIOError(f"{rec.rec_path}: record at byte offset {off} announces a label array "
                                    "but holds none")
            first = rec._bytes_at(offsets[simple][arrays] + 8 + IR_HEADER.size, 4)
            label[arrays] = first.view("<f4").ravel()
        labels[simple] = label
        for i in np.flatnonzero(~simple):
            off = int(offsets[i])
            labels[i] = first_label(unpack_record(rec.read_at(off), f"{rec.rec_path}: record at byte offset {off}")[0])
        limit = declared if declared is not None else 1 << 24
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(labels) & (labels >= 0) & (labels < limit) & (labels == np.floor(labels)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            rule = (f"in [0, {declared}), the identities record 0 declares" if declared is not None else
                    "in [0, 2**24), where float32 labels are exact")
            raise RecordIOError(f"{rec.rec_path}: record {int(self.keys[i])} (byte offset {int(offsets[i])}) has "
                                f"label {float(labels[i])!r}, not an identity: labels must be integers {rule}"
                                f"{f' ({int(bad.sum())} records in all)' if bad.sum() > 1 else ''}")
        return labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, index: int) -> tuple[IRHeader, bytes, int]:
        offset = int(self._offsets[index])
        where = f"{self.file.rec_path}: record {int(self.keys[index])} at byte offset {offset}"
        header, image = unpack_record(self.file.read_at(offset), where)
        return header, image, offset

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        _, data, offset = self.read(index)
        where = f"{self.file.rec_path}: record {int(self.keys[index])} at byte offset {offset}"
        try:
            check_training_image(data, where, self.image_size, self.mismatch)
            pixels = decode_image_uint8(data, where)
        except ValueError as exc:
            raise RecordIOError(str(exc)) from None
        pixels = resize_uint8(pixels, self.image_size)
        image = pixels if self.as_uint8 else pixels.float().div_(127.5).sub_(1.0)
        return image, int(self.targets[index]), index


def rec_paths(path: str | os.PathLike) -> tuple[Path, Path] | None:
    """(rec, idx) if `path` is a .rec file or a folder holding train.rec, else None."""
    path = Path(path)
    if path.is_file() and path.suffix == ".rec":
        return path, path.with_suffix(".idx")
    if path.is_dir() and (path / "train.rec").is_file():
        return path / "train.rec", path / "train.idx"
    return None


def open_dataset(path: str | os.PathLike, image_size: int | None = 112, as_uint8: bool = False,
                 mismatch: str = "resize") -> Dataset:
    """The training set at `path`: a .rec (with its .idx beside it), a folder holding train.rec
    (insightface's faces_*_112x112 layout), or an identity-folder root. Items are (image, label, index).
    mismatch: what an image that is not RGB image_size x image_size gets, 'resize' or 'refuse' (then the
    first image is read at once, so a set of the wrong size fails before training starts)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"training data {str(path)!r} does not exist")
    paths = rec_paths(path)
    if paths is not None:
        dataset = RecordDataset(*paths, image_size=image_size, as_uint8=as_uint8, mismatch=mismatch)
    elif path.is_file():
        raise ValueError(f"training data {str(path)!r} is a file but not a .rec: pass a .rec, a folder holding "
                         "train.rec, or an identity-folder root")
    else:
        dataset = IdentityFolderDataset(path, image_size, as_uint8=as_uint8, mismatch=mismatch)
    if mismatch == "refuse":
        dataset[0]
    return dataset


def pack_folder(folder: str | os.PathLike, rec_path: str | os.PathLike, progress: bool = True) -> tuple[Path, Path]:
    """Pack an identity-folder tree into insightface's layout (record 0, image records 1..n with the
    files' own encoded bytes, then one range record per identity). Returns (rec, idx)."""
    import io

    from PIL import Image, UnidentifiedImageError
    from tqdm.auto import tqdm

    rec_path = Path(rec_path)
    if rec_path.suffix != ".rec":
        raise ValueError(f"the output must end in .rec, got {str(rec_path)!r}")
    listing = IdentityFolderDataset(folder, image_size=None)
    n, classes = len(listing.samples), len(listing.classes)
    ranges, start = [], 1
    for label in range(classes):
        count = int((listing.targets == label).sum())
        ranges.append((start, start + count))
        start += count
    with RecordWriter(rec_path) as writer:
        writer.write(0, pack_record([n + 1, n + 1 + classes], b""))
        for key, (rel, label) in enumerate(tqdm(listing.samples, desc=f"packing {rec_path.name}", unit="img",
                                                dynamic_ncols=True, disable=not progress, leave=False), start=1):
            data = (listing.root / rel).read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img.verify()
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise ValueError(f"{listing.root / rel} is not a readable image: {exc}") from None
            writer.write(key, pack_record(float(label), data, id=key))
        for label, (a, b) in enumerate(ranges):
            writer.write(n + 1 + label, pack_record([a, b], b"", id=n + 1 + label))
    return writer.rec_path, writer.idx_path
