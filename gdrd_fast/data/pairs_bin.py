"""insightface verification pairs (.bin): pickle of (list of 2N encoded images, list of N bools).

Pair k is (images[2k], images[2k+1]) with label issame[k]. Reading never runs plain pickle: the
unpickler resolves no global at all, so nothing can be imported or called, and the result must be
built only of bytes, lists, tuples and bools. One global is accepted as data: Python 3 pickles
bytes with protocols 0-2 as `_codecs.encode(text, 'latin1')`, answered here by a function that only
converts a str to bytes.

The work is bounded by the file's size: before unpickling, the opcodes are scanned (pickletools)
and only those that build bytes, lists, tuples and bools are allowed, with memo indices no larger than
the opcode count; the result's walk visits each list once and refuses a list reached twice (shared or
self-referential), so a 600-byte file cannot describe 2^40 paths; the decoded images are counted
against a memory limit before they are decoded.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .images import atomic_write_bytes, decode_image, encode_png

_ALLOWED = (bytes, list, tuple, bool)
MAX_FILE_BYTES = 8 * 2 ** 30  # LFW's lfw.bin is about 64 MB
MAX_DECODED_BYTES = 32 * 2 ** 30  # float32 images after decoding
# opcodes that build bytes, lists, tuples, bools (INT: protocol 0/1 bools) and the `_codecs.encode` call
_OPCODES = frozenset("""PROTO FRAME STOP MARK POP POP_MARK EMPTY_LIST LIST APPEND APPENDS EMPTY_TUPLE TUPLE TUPLE1
    TUPLE2 TUPLE3 BINBYTES SHORT_BINBYTES BINBYTES8 STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE
    SHORT_BINUNICODE BINUNICODE8 NEWTRUE NEWFALSE INT GLOBAL STACK_GLOBAL REDUCE PUT BINPUT LONG_BINPUT MEMOIZE
    GET BINGET LONG_BINGET""".split())
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The file asks for something other than bytes, lists, tuples and bools."""


def _latin1_bytes(text, encoding):
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode is accepted only as (str, 'latin1') -> bytes")
    return text.encode("latin1")


class _BytesListsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise UnsafePickleError(f"refusing to load global {module}.{name}: a pairs .bin may hold only "
                                "bytes, lists, tuples and bools")

    def persistent_load(self, pid):
        raise UnsafePickleError("refusing a persistent id: a pairs .bin may hold only bytes, lists, tuples and bools")


def _check_opcodes(data: bytes) -> None:
    """Refuse opcodes that build anything else, and memo indices the opcode count cannot justify (C's
    unpickler sizes its memo by the largest index: one 5-byte LONG_BINPUT could ask for gigabytes)."""
    for count, (op, arg, pos) in enumerate(pickletools.genops(data), start=1):
        if op.name not in _OPCODES:
            made = op.stack_after[0].name if op.stack_after else "no value"
            raise UnsafePickleError(f"pickle opcode {op.name} at byte {pos} (it makes a {made}): a pairs .bin "
                                    "may hold only bytes, lists, tuples and bools")
        if op.name in _PUTS and not 0 <= int(arg) <= count:
            raise UnsafePickleError(f"pickle memo index {arg} at byte {pos} is out of range")


def _check_types(obj, where: str = "root") -> None:
    """Every value is bytes, list, tuple or bool; each list or tuple is reached once (so no cycle, and
    the walk is as long as the file, not as the number of paths through shared lists)."""
    seen: set[int] = set()
    stack = [(obj, where)]
    while stack:
        item, at = stack.pop()
        if type(item) not in _ALLOWED:
            raise UnsafePickleError(f"{at} is a {type(item).__name__}: a pairs .bin may hold only "
                                    "bytes, lists, tuples and bools")
        if isinstance(item, (list, tuple)):
            if id(item) in seen:
                raise UnsafePickleError(f"{at} is a list already reached by another path (shared or "
                                        "self-referential): a pairs .bin holds plain lists")
            seen.add(id(item))
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(item))


def restricted_loads(data: bytes):
    """Unpickle `data` allowing only bytes, lists, tuples and bools; anything else raises UnsafePickleError.
    Truncated or malformed data raises ValueError or pickle.UnpicklingError."""
    try:
        _check_opcodes(data)
    except ValueError as exc:  # pickletools' words for truncated or malformed data
        if isinstance(exc, UnsafePickleError):
            raise
        raise pickle.UnpicklingError(f"not a complete pickle: {exc}") from None
    obj = _BytesListsUnpickler(io.BytesIO(data), encoding="bytes").load()  # py2 str -> bytes
    _check_types(obj)
    return obj


def read_pairs_bin(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> tuple[list[bytes], list[bool]]:
    """The raw (encoded images, issame) of an insightface .bin, checked for shape and types. Every failure
    names `path`: UnsafePickleError for content that is not data, ValueError for a truncated or corrupt file."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise ValueError(f"{path}: {size} bytes, more than max_bytes={max_bytes} for a pairs .bin")
    try:
        obj = restricted_loads(Path(path).read_bytes())
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, OverflowError,
            MemoryError, RecursionError) as exc:  # what malformed pickles raise
        raise ValueError(f"{path}: truncated or corrupt pairs .bin ({type(exc).__name__}: {exc})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pair (images, issame), got a {type(obj).__name__}")
    images, issame = obj
    if not all(isinstance(b, bytes) for b in images) or not all(isinstance(s, bool) for s in issame):
        raise ValueError(f"{path}: expected (list of bytes, list of bool)")
    if len(images) != 2 * len(issame) or not issame:
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (need 2 per pair, at least 1 pair)")
    return list(images), list(issame)


def load_pairs_bin(path: str | os.PathLike, progress: bool = True,
                   max_decoded_bytes: int = MAX_DECODED_BYTES) -> tuple[Tensor, Tensor]:
    """Decoded pairs: images (2N, 3, H, W) float32 in [-1, 1] RGB, issame (N,) bool."""
    encoded, issame = read_pairs_bin(path)

    def decode(data: bytes) -> Tensor:
        from PIL import Image
        try:
            return decode_image(data)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # bytes that are not an image
            raise ValueError(f"{path}: an image does not decode ({type(exc).__name__}: {exc})") from None

    first = decode(encoded[0])
    need = first.numel() * first.element_size() * len(encoded)
    if need > max_decoded_bytes:
        raise ValueError(f"{path}: {len(encoded)} images of {tuple(first.shape)} need {need / 2**30:.1f} GiB "
                         f"decoded, more than max_decoded_bytes={max_decoded_bytes}")
    images = [first] + [decode(b) for b in tqdm(encoded[1:], initial=1, total=len(encoded),
                                                 desc=f"decoding {Path(path).name}", unit="img",
                                                 dynamic_ncols=True, disable=not progress, leave=False)]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{path}: images have different shapes {sorted(shapes)}")
    return torch.stack(images), torch.tensor(issame, dtype=torch.bool)


def write_pairs_bin(path: str | os.PathLike, images: Tensor | Sequence[bytes], issame: Sequence[bool] | Tensor) -> None:
    """Write an insightface .bin atomically. images: (2N, 3, H, W) floats in [-1, 1] (stored as PNG)
    or 2N already-encoded byte strings."""
    issame = [bool(s) for s in (issame.tolist() if isinstance(issame, Tensor) else issame)]
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (2N, 3, H, W), got {tuple(images.shape)}")
        encoded = [encode_png(im) for im in images]
    else:
        encoded = list(images)
        if not all(isinstance(b, bytes) for b in encoded):
            raise TypeError("images must be a tensor or a sequence of bytes")
    if len(encoded) != 2 * len(issame) or not issame:
        raise ValueError(f"images has {len(encoded)} entries for {len(issame)} pairs: need 2 per pair, at least 1 pair")
    atomic_write_bytes(path, pickle.dumps((encoded, issame), protocol=4))
