"""Every op and Module of benchmarks/host_calls.py captured in a CUDA graph, replayed against eager.

A captured call replays its kernels without the host: it must not read a device value while captured
(tests/lib/test_sync_free.py checks that on CPU) and must give what eager gives. Two identical builds run
the same number of steps, one eagerly, one as warm-up + capture + replays (and once more through
torch.compile(mode="reduce-overhead"), torch's own CUDA-graph path); their outputs and written state must
agree. Calls that draw from the global generator draw other values when replayed, so for them only the
shapes and finiteness are compared.
"""
from __future__ import annotations

import pytest
import torch
import test_sync_free  # noqa: F401  (puts the repository on sys.path)

from benchmarks.host_calls import CALLS, Call  # noqa: E402

pytestmark = pytest.mark.cuda
STEPS = 3  # each side runs this many steps: the graph side as 1 warm-up + capture + STEPS - 1 replays


# Not a device read, so the CPU sync-free test cannot see it, but torch refuses it while a graph is captured:
# reading the CUDA generator's state (to restore it if the call fails). It sits in files this test does not fix.
GENERATOR_STATE = {
    "CRDLoss(drawn)": "gdrd_fast/losses.py:57 reads the generator state (get_state) before drawing",
    **{name: "gdrd_fast/losses.py:57 reads the generator state (get_state) before drawing"
       for name in ("RelationalContrastiveLoss(supervised)", "RelationalContrastiveLoss(unsupervised)")}}


def _params(capture: bool):
    """A generator-state read fails on the host before anything is captured, so it runs, expected to fail.
    Compiled, it only breaks the graph, so those cases run, not strict."""
    params = []
    for name in CALLS:
        if name in GENERATOR_STATE and capture:
            params.append(pytest.param(name, marks=pytest.mark.xfail(strict=False, reason=GENERATOR_STATE[name])))
        else:
            params.append(name)
    return params


def _agree(name: str, call: Call, got, want) -> None:
    assert len(got) == len(want), f"{name}: {len(got)} outputs, eager {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: output {i} is {g.shape} {g.dtype}, eager {w.shape}"
        if g.is_floating_point():
            assert torch.isfinite(g).all(), f"{name}: output {i} has NaN/Inf"
        if not call.draws:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{name}: output {i}: {m}")


def _eager(name: str) -> tuple[Call, tuple]:
    call = CALLS[name]("cuda")
    for _ in range(STEPS):
        out = call.run()
    return call, tuple(t.clone() for t in out)


@pytest.mark.parametrize("name", _params(capture=True))
def test_cuda_graph_replay_matches_eager(name):
    eager, want = _eager(name)
    call = CALLS[name]("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
        call.run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call.run()
    for _ in range(STEPS - 1):
        graph.replay()
    torch.cuda.synchronize()
    _agree(name, eager, out, want)
    _agree(name + " state", eager, call.state, eager.state)


@pytest.mark.parametrize("name", _params(capture=False))
def test_compile_reduce_overhead_matches_eager(name):
    torch._dynamo.reset()
    eager, want = _eager(name)
    call = CALLS[name]("cuda")
    step = torch.compile(call.run, mode="reduce-overhead")
    for _ in range(STEPS):
        out = tuple(t.clone() for t in step())  # a CUDA-graph output is overwritten by the next replay
    torch.cuda.synchronize()
    _agree(name, eager, out, want)
    _agree(name + " state", eager, call.state, eager.state)
