"""No call reads a device value on the host once value checks are off (the GPU default).

On a GPU such a read (.item(), bool(tensor), .tolist(), nonzero, int/float/index of a tensor) waits for
every queued kernel, so the host can no longer run ahead of the GPU, and a CUDA graph cannot capture the
call. The CPU has no such wait to observe, so here those reads raise instead, and every op and Module of
benchmarks/host_calls.py runs under them. Each case is built first, outside the guard: a Module's steady
state (log Z set, queue full) is reached by design through reads that stop once it is reached.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.host_calls import CALLS, value_checks_off  # noqa: E402

# Tensor methods that copy a value to the host; torch.nonzero has a data-dependent output size
READS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")

class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def host_reads_raise():
    def refusing(name):
        def read(*args, **kwargs):
            raise HostRead(f"{name} reads a device value on the host")
        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, refusing(f"Tensor.{name}"))
        patch.setattr(torch, "nonzero", refusing("torch.nonzero"))
        yield


@pytest.mark.parametrize("read", [
    lambda t: t.item(), lambda t: bool(t), lambda t: t.tolist(), lambda t: torch.nonzero(t), lambda t: t.nonzero(),
    lambda t: int(t), lambda t: float(t), lambda t: [0, 1][t]], ids=[
    "item", "bool", "tolist", "torch.nonzero", "Tensor.nonzero", "int", "float", "index"])
def test_the_guard_catches_each_read(read):
    with host_reads_raise(), pytest.raises(HostRead):
        read(torch.ones((), dtype=torch.long))


def test_the_guard_is_lifted():
    with host_reads_raise():
        pass
    assert torch.ones(()).item() == 1.0


@pytest.mark.parametrize("name", list(CALLS))
def test_no_host_read(name):
    with value_checks_off():
        call = CALLS[name]("cpu")
        with host_reads_raise():
            first = call.run()
            second = call.run()
    assert all(torch.isfinite(t).all() for t in (*first, *second) if t.is_floating_point())
