"""Atomic file writes: a file is written beside its target under a temporary name, fsynced and renamed
over it, so a reader (or a resumed run) sees the old file or the new one, never half of one.

The temporary name, `.<name>.tmp-<host>-<pid>-<random>`, says which process wrote it. A process killed
mid-write (SIGKILL, power loss) leaves its temporary file behind; `remove_stale` deletes those of
writers on this host that no longer run, and every write calls it for its own target first.
A full disk or a file-size limit (`ulimit -f`) raises WriteError: one line naming the target; the
earlier file at the target stays as it was.
"""
from __future__ import annotations

import errno
import os
import re
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_STALE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]+$")
# the temporary names of earlier releases (tempfile.mkstemp beside checkpoints; .tmp<pid> elsewhere)
_LEGACY = re.compile(r"^\.(?P<name>.+?)\.(?:[A-Za-z0-9_]{8}\.tmp|tmp(?P<pid>\d+))$")
_NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than this process may write "
            "(ulimit -f)", errno.EDQUOT: "the disk quota is exceeded"}


class WriteError(OSError):
    """A write that could not finish for lack of room (full disk, quota, file-size limit) or another OS
    error; the message is one line naming the target, and the target's earlier file is unchanged."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        reason = _NO_ROOM.get(cause.errno, cause.strerror or str(cause))
        super().__init__(f"could not write {os.fspath(path)}: {reason}; any earlier {Path(path).name} is "
                         "left as it was")
        self.errno, self.path = cause.errno, os.fspath(path)


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files in `folder` (of target `name`, or of every target) left by writers
    on this host that no longer run, and those of earlier releases; returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        found = _STALE.match(entry.name)
        if found:
            if found["host"] != _HOST or _alive(int(found["pid"])):
                continue
        else:
            found = _LEGACY.match(entry.name)
            if found is None or found["pid"] is not None and _alive(int(found["pid"])):
                continue
        if name is not None and found["name"] != name or not entry.is_file():
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; Windows cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RecordingFile:
    """A file object that remembers the first OSError of a write: torch.save turns it into a RuntimeError
    about zip positions, and the cause is what the user needs to read."""

    def __init__(self, f: BinaryIO):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w+b") -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; on a clean exit it is flushed, fsynced and renamed over
    `path`; on any error it is deleted and the error re-raised (a full disk as WriteError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, path.name)
    tmp = temp_name(path)
    try:
        raw = open(tmp, mode)
    except OSError as exc:  # a read-only folder, say: named by the target, not the temporary name
        raise WriteError(path, exc) from None
    try:
        with raw:
            f = _RecordingFile(raw)
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise WriteError(path, exc) from None
            except Exception:
                if f.error is not None:
                    raise WriteError(path, f.error) from None
                raise
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Atomically write whatever `write(f)` writes to the open temporary file."""
    with atomic_open(path) as f:
        write(f)
    return Path(path)
