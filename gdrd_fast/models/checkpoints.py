"""Checkpoint files and pretrained weights: checksummed atomic writes, safe verified reads, exact key matching.

A checkpoint written here is an ordinary torch.save zip archive (torch.load reads it as is) whose zip
comment records the SHA-256 of every byte before it: b"gdrd_fast sha256=<64 hex digits>". Reading
verifies that digest before torch.load(weights_only=True), so a flipped bit, a truncated copy or
random bytes raise CorruptCheckpointError naming the file; never torch's advice to retry unsafely.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..atomic import write_with

_TAG = b"gdrd_fast sha256="
_COMMENT_LEN = len(_TAG) + 64
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes + comment, at the end of the file
_EOCD_LEN = 22


class CorruptCheckpointError(ValueError):
    """A checkpoint or weights file that cannot be trusted: truncated, empty, altered, or not a checkpoint."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path)
        super().__init__(f"{self.path} is corrupt or not a checkpoint: {reason}")


def _sha256(f, length: int) -> str:
    f.seek(0)
    digest, left = hashlib.sha256(), length
    while left:
        chunk = f.read(min(left, 1 << 22))
        if not chunk:
            raise EOFError("file shrank while it was read")
        digest.update(chunk)
        left -= len(chunk)
    return digest.hexdigest()


def write_checkpoint(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` with its SHA-256, atomically (gdrd_fast.atomic: written beside it, fsynced,
    renamed over it). A failure leaves any earlier file at `path` as it was; a full disk or `ulimit -f`
    raises gdrd_fast.atomic.WriteError naming `path`."""
    def save(f):
        torch.save(obj, f)
        size = f.seek(0, os.SEEK_END)
        f.seek(size - _EOCD_LEN)
        eocd = f.read(_EOCD_LEN)
        if size < _EOCD_LEN or eocd[:4] != _EOCD or eocd[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its file with a comment-free zip directory record")
        f.seek(size - 2)
        f.write(_COMMENT_LEN.to_bytes(2, "little"))
        digest = _sha256(f, size)
        f.seek(size)
        f.write(_TAG + digest.encode())

    return write_with(path, save)


def _stored_digest(f, size: int, path: Path) -> str | None:
    """The digest recorded in the file's zip comment; None if the file has no such record."""
    f.seek(max(0, size - _EOCD_LEN - _COMMENT_LEN))
    tail = f.read()
    at = tail.rfind(_EOCD)
    if at < 0 or tail[at + _EOCD_LEN - 2: at + _EOCD_LEN] != _COMMENT_LEN.to_bytes(2, "little"):
        return None
    comment = tail[at + _EOCD_LEN:]
    if len(comment) != _COMMENT_LEN or not comment.startswith(_TAG):
        raise CorruptCheckpointError(path, "its SHA-256 record is cut short or overwritten")
    return comment[len(_TAG):].decode("ascii", "replace")


def _first_line(exc: BaseException) -> str:
    """What went wrong, in one line, without torch's advice to retry with weights_only=False."""
    text = str(exc)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if unpickler:
        text = unpickler.group(1)
    elif "weights_only" in text:
        text = "its pickle could not be read safely"
    lines = text.strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_checkpoint(path: str | os.PathLike, map_location="cpu", *, require_digest: bool = True,
                    what: str = "checkpoint"):
    """torch.load(weights_only=True) of `path` after checking its SHA-256. require_digest=False also reads
    files written elsewhere (released weights), which carry no digest; a digest present is always checked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no file at {os.fspath(path)!r}")
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            raise CorruptCheckpointError(path, "the file is empty")
        stored = _stored_digest(f, size, path)
        if stored is None and require_digest:
            raise CorruptCheckpointError(path, "it ends without the SHA-256 record that gdrd_fast writes "
                                               "(cut short, or not written by gdrd_fast)")
        if stored is not None and _sha256(f, size - _COMMENT_LEN) != stored:
            raise CorruptCheckpointError(path, "its SHA-256 does not match the one recorded when it was written "
                                               "(the file changed on disk or in transfer)")
        f.seek(0)
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except Exception as exc:  # whatever torch makes of bad bytes, the answer is the same
            unsafe = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if unsafe:  # a pickled Python object: refused, and no advice to load it unsafely
                raise CorruptCheckpointError(path, f"it holds a pickled {unsafe.group(1)}, and checkpoints are "
                                                   "read as tensors and plain containers only") from None
            raise CorruptCheckpointError(path, f"torch.load failed ({_first_line(exc)})") from None


def read_state_dict(source, *, what: str = "weights") -> dict[str, Tensor]:
    """A state dict from a mapping or a local file (.safetensors, or a torch file read with weights_only=True)."""
    if isinstance(source, Mapping):
        state = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no file at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file  # comes with diffusers / huggingface_hub
            try:
                state = load_file(path)
            except SafetensorError as exc:
                raise CorruptCheckpointError(path, _first_line(exc)) from None
        else:
            state = read_checkpoint(path, require_digest=False, what=what)
        if not isinstance(state, Mapping):
            raise ValueError(f"{what}: {path!r} holds a {type(state).__name__}, not a state dict")
        state = dict(state)
    else:
        raise TypeError(f"{what} must be a path or a state dict, got {type(source).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{what}: not a state dict of tensors (entries {bad[:5]!r} are not str -> Tensor)")
    return state


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop `prefix` (DataParallel / DDP wrappers save 'module.'-prefixed keys) where present."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:8])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_exact(module: nn.Module, state: Mapping[str, Tensor], *, what: str) -> nn.Module:
    """load_state_dict(strict=True), checked first so a failure names every bad key and leaves `module` as it was."""
    own = module.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_listing(wrong_shape)}")
    if problems:
        raise ValueError(f"{what} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module
