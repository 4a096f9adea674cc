"""insightface verification pairs (.bin): pickle of (list of 2N encoded images, list of N bools).

Pair k is (images[2k], images[2k+1]) with label issame[k]. Reading never runs plain pickle: the
unpickler resolves no global at all, so nothing can be imported or called, and the result must be
built only of bytes, lists, tuples and bools. One global is accepted as data: Python 3 pickles
bytes with protocols 0-2 as `_codecs.encode(text, 'latin1')`, answered here by a function that only
converts a str to bytes.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .images import atomic_write_bytes, decode_image, encode_png

_ALLOWED = (bytes, list, tuple, bool)


class UnsafePickleError(pickle.UnpicklingError):
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


def _check_types(obj, where: str = "root") -> None:
    stack = [(obj, where)]
    while stack:
        item, at = stack.pop()
        if type(item) not in _ALLOWED:
            raise UnsafePickleError(f"{at} is a {type(item).__name__}: a pairs .bin may hold only "
                                    "bytes, lists, tuples and bools")
        if isinstance(item, (list, tuple)):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(item))


def restricted_loads(data: bytes):
    """Unpickle `data` allowing only bytes, lists, tuples and bools; anything else raises UnsafePickleError."""
    obj = _BytesListsUnpickler(io.BytesIO(data), encoding="bytes").load()  # py2 str -> bytes
    _check_types(obj)
    return obj


def read_pairs_bin(path: str | os.PathLike) -> tuple[list[bytes], list[bool]]:
    """The raw (encoded images, issame) of an insightface .bin, checked for shape and types."""
    obj = restricted_loads(Path(path).read_bytes())
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pair (images, issame), got a {type(obj).__name__}")
    images, issame = obj
    if not all(isinstance(b, bytes) for b in images) or not all(isinstance(s, bool) for s in issame):
        raise ValueError(f"{path}: expected (list of bytes, list of bool)")
    if len(images) != 2 * len(issame) or not issame:
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs (need 2 per pair, at least 1 pair)")
    return list(images), list(issame)


def load_pairs_bin(path: str | os.PathLike, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Decoded pairs: images (2N, 3, H, W) float32 in [-1, 1] RGB, issame (N,) bool."""
    encoded, issame = read_pairs_bin(path)
    images = [decode_image(b) for b in tqdm(encoded, desc=f"decoding {Path(path).name}", unit="img",
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
