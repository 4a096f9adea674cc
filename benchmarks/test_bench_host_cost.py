"""Host cost: every public call, forward + backward, at B=4, K=16, D=8 (benchmarks/host_calls.py), where the
arithmetic is negligible and the time of a call is what the host spends issuing it.

Providers of each call: "gdrd_fast" (value checks as the device has them by default: on for CPU tensors,
off on GPU), on CPU also "gdrd_fast-unchecked" (value checks off, as on a GPU), and "eager", the code the
call replaces (MoCo, RepDistiller, pytorch-metric-learning if installed, a 1x1 conv + MSE), and for each
functional call "gdrd_fast-backend", the backend it dispatches to called directly on the same inputs:
the functional call's time less that one is what its checks and dispatch cost (docs/performance). That
difference of two large times is noisy for the large calls, so each functional call is also timed with every
backend answering from memory (host_calls.answer_from_memory, value checks off): "gdrd_fast-dispatch" is the
call, "backend-stub" the backend called directly and reduced alike, and their difference is the call's
dispatch overhead alone. The case "one bare torch op" (torch.add on 4x8) is the unit: the report gives every
call's time in bare ops too.
Run it on one thread (OMP_NUM_THREADS=1) so that the ratios hold still on a shared machine.

On CUDA, each case also records host_s (benchmarks/harness.py, as every CUDA benchmark does): the host time
of one call issued back to back without a sync, next to do_bench's CUDA time; whichever is larger bounds
that call on the GPU.
"""
from __future__ import annotations

import pytest
import torch

from gdrd_fast import validation
from .harness import bench_device, measure
from .host_calls import BACKEND, CALLS, EAGER, answer_from_memory, bare_op

OP = "host cost"
BARE = "one bare torch op"
DISPATCH, STUB = "gdrd_fast-dispatch", "backend-stub"


def _cases() -> list:
    device = bench_device()
    checked = ["gdrd_fast"] + (["gdrd_fast-unchecked"] if device == "cpu" else [])
    params = []
    for name in CALLS:
        providers = (checked + (["gdrd_fast-backend", DISPATCH, STUB] if name in BACKEND else [])
                     + (["eager"] if name in EAGER else []))
        params += [pytest.param(p, name, device, id=f"{name}-{p}") for p in providers]
    # the unit last, on a warm process: as the session's first case it read twice its time
    return params + [pytest.param("bare-op", BARE, device, id=f"bare-op-{device}")]


def build(provider: str, size_key: str, device: str):
    if size_key == BARE:
        return bare_op(device).run
    return {"eager": EAGER, "gdrd_fast-backend": BACKEND, STUB: BACKEND}.get(provider, CALLS)[size_key](device).run


@pytest.mark.parametrize("provider,size_key,device", _cases())
def test_host_cost(benchmark, monkeypatch, provider, size_key, device):
    if provider in ("gdrd_fast-unchecked", DISPATCH, STUB):
        monkeypatch.setattr(validation, "value_checks", lambda t: False)
    if provider in (DISPATCH, STUB):
        answer_from_memory(monkeypatch)
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=200, memory=False,
            threads=torch.get_num_threads())
