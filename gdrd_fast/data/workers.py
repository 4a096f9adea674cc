"""Errors raised in DataLoader workers, told as they were raised.

torch re-raises a worker's exception in the main process as the same class built from one long
message, "Caught RecordIOError in DataLoader worker process 0. Original Traceback ...", which holds
the worker's whole traceback. `original_error` gives back the exception the worker raised: its class
and its own message, so it reads as it would with num_workers=0.
"""
from __future__ import annotations

import re

_WRAPPED = re.compile(r"^Caught (?P<name>\w+) in (?P<where>[^\n]+?)\.\nOriginal Traceback", re.S)


def original_error(exc: BaseException) -> BaseException:
    """The worker's own exception behind a re-raised DataLoader one (exc itself when it is not one)."""
    text = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    found = _WRAPPED.match(text)
    if found is None:
        return exc
    name = found["name"]
    # the traceback's last lines: "<module.>Name: message" (a message may span lines)
    tail = re.search(rf"\n(?:[\w.]+\.)?{re.escape(name)}(?::[ ]?(?P<message>.*))?\s*$", text, re.S)
    message = (tail["message"] or "").strip() if tail else text.splitlines()[-1]
    if type(exc).__name__ == name:
        try:
            return type(exc)(message)
        except Exception:  # a class that is not built from one message
            pass
    return RuntimeError(f"{name} in {found['where']}: {message}")
