"""Ctrl-C and SIGTERM during training: the step under way finishes, its checkpoint is written, and the
run stops (exit 130 for SIGINT, 143 for SIGTERM, as a shell reports a process those signals end).
A second signal stops at once, without a checkpoint. SIGXFSZ (a write past `ulimit -f`) is ignored
within the run, so that the write fails with an error that names its file (gdrd_fast.atomic).

Only `stop_gracefully()` installs the handlers (`gdrd-fast train` does, for the whole run); without it a
signal acts as Python's default. DataLoader workers ignore both signals (`quiet_worker`): the terminal
sends Ctrl-C to every process of the job, and a worker that died of it would break the step under way;
the main process ends them when it stops.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_requested: int | None = None  # the signal that asked the run to stop, while the handlers are installed


class StopRequested(KeyboardInterrupt):
    """The run stopped on a signal; exit_code is 128 + the signal's number (130 for SIGINT)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def requested() -> int | None:
    """The signal that asked the run to stop after its current step, or None."""
    return _requested


def _handle(signum, frame) -> None:
    global _requested
    if _requested is not None:  # the second signal: stop now
        raise StopRequested(signum, f"stopped at once by {signal.Signals(signum).name}; the last checkpoint "
                                    "is the one written before")
    _requested = signum
    sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after the current step, once its checkpoint is "
                     "written; press Ctrl-C again to stop at once\n")
    sys.stderr.flush()


@contextmanager
def stop_gracefully() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM ask the training loop to stop after its current step (main
    thread only: elsewhere Python cannot install handlers, and the block changes nothing)."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGXFSZ"):  # past `ulimit -f` a write then fails with EFBIG, reported by name
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    _requested = None
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None


def quiet_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: the main process alone decides when the job stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
