"""crd_nce_loss: custom ops and autograd over the compiled gathered kernels (docs/ops/crd.md).

The kernels live in csrc/ (cpu/crd_nce.cpp, cuda/crd_nce.cu):
- torch.ops.gdrd_fast_C.crd_nce_forward(anchor, memory, idx, inv_t, log_z, c, eps, need_grad)
  -> (rows [B], d row_b / d anchor_b [B, D] or empty)
- torch.ops.gdrd_fast_C.crd_nce_pair_forward(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx,
  inv_t, c, eps, need_grad) -> (rows_a, grad_a, rows_b, grad_b): both sides of CRDLoss, one idx read.
When the gather would read the bank many times over (`dense_wins`: B(K+1) >= 2N on GPU, K+1 >= 2N on
CPU), `dense_forward` scores every bank row once with a GEMM instead and weights each score by how often
its row was drawn: the same loss and gradient for less memory traffic.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .. import backends, reference
from ..backends import Backend, Op
from ._twin import eager_twin
from ..numerics import compute_dtype


# the CUDA kernels keep a row in registers, 16 values per lane of a warp: kMaxPerLane * 32 in
# csrc/cuda/crd_nce.cu (tests/lib/test_dispatch.py reads it there)
CUDA_MAX_D = 512


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def crd_nce_rows(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float, log_z: Tensor, n_data: int,
                 eps: float, kernel: str) -> Tensor:
    """Per-row losses [B] in the accumulation dtype from a compiled kernel, with autograd to anchor."""
    c = (idx.shape[1] - 1) / n_data
    return crd_nce(anchor, memory, idx, log_z, temperature, c, eps, kernel, _needs_grad(anchor))[0]


def crd_nce_pair_rows(anchor_a: Tensor, memory_a: Tensor, log_z_a: Tensor, anchor_b: Tensor, memory_b: Tensor,
                      log_z_b: Tensor, idx: Tensor, *, temperature: float, n_data: int, eps: float,
                      kernel: str) -> tuple[Tensor, Tensor]:
    """Both sides' per-row losses from one read of idx, with autograd to both anchors."""
    c = (idx.shape[1] - 1) / n_data
    rows_a, _, rows_b, _ = crd_nce_pair(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, temperature,
                                        c, eps, kernel, _needs_grad(anchor_a, anchor_b))
    return rows_a, rows_b


def _reference_pair_rows(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, *, temperature, n_data,
                         eps):
    kw = dict(temperature=temperature, n_data=n_data, eps=eps)
    return (reference.crd_nce_rows(anchor_a, memory_a, idx, log_z=log_z_a, **kw),
            reference.crd_nce_rows(anchor_b, memory_b, idx, log_z=log_z_b, **kw))


def _backend(function, kernel: str, op: str) -> Backend:
    """A compiled backend: `function` bound to the compiled op of that name (every float dtype; on CUDA,
    D <= CUDA_MAX_D)."""
    check = backends.with_cpu_extension if kernel == "cpu" else backends.with_cuda_extension
    max_sizes = (lambda dtype: {"d": CUDA_MAX_D}) if kernel == "cuda" else None
    return Backend(lambda: functools.partial(function, kernel=kernel), backends.with_compiled_op(op, check),
                   max_sizes=max_sizes, kernel=lambda: getattr(torch.ops.gdrd_fast_C, op))


# backend -> (anchor, memory, idx, *, temperature, log_z, n_data, eps) -> rows [B]
IMPLS = Op("crd_nce_loss", {
    "torch": Backend(lambda: reference.crd_nce_rows, backends.anywhere),
    **{k: _backend(crd_nce_rows, k, "crd_nce_forward") for k in ("cpu", "cuda")},
})
# backend -> (anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, *, temperature, n_data, eps)
#            -> (rows_a, rows_b)
PAIR_IMPLS = Op("crd_nce_pair_loss", {
    "torch": Backend(lambda: _reference_pair_rows, backends.anywhere),
    **{k: _backend(crd_nce_pair_rows, k, "crd_nce_pair_forward") for k in ("cpu", "cuda")},
})

# the pair kernels by backend name, read from the table (benchmarks/test_bench_crd.py times them alone)
PAIR_KERNELS = {k: PAIR_IMPLS[k].kernel for k in ("cpu", "cuda")}


def crd_log_z_chunked(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float, n_data: int) -> Tensor:
    """reference.crd_log_z over chunks of rows: the gather stays small; the estimate is one log-sum-exp."""
    with torch.no_grad():
        dt = compute_dtype(anchor)
        chunk = max(1, 2 ** 22 // (idx.shape[1] * anchor.shape[1]))
        lse = torch.stack([
            torch.logsumexp(reference.crd_scores(anchor[i:i + chunk], memory, idx[i:i + chunk]).flatten()
                            / temperature, 0)
            for i in range(0, anchor.shape[0], chunk)]).to(dt)
        return torch.logsumexp(lse, 0) - math.log(idx.numel()) + math.log(n_data)


def crd_log_z_cpu(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float, n_data: int) -> Tensor:
    """The C++ kernel (csrc/cpu/crd_nce.cpp): one call scores the gathered rows into one log-sum-exp, where
    the chunked path takes a dozen torch calls."""
    return torch.ops.gdrd_fast_C.crd_log_z.default(anchor.detach(), memory.detach(), idx, 1.0 / temperature,
                                                   math.log(n_data) - math.log(idx.numel()))


def _log_z_cpu_unavailable(device: torch.device) -> str | None:
    """with_compiled_op's check; once the op is there, its shape for FakeTensor (torch.compile traces the
    compiled op itself: it has no gradient, so it needs no custom op around it)."""
    reason = backends.with_compiled_op("crd_log_z", backends.with_cpu_extension)(device)
    if reason is None:
        _register_log_z_fake()
    return reason


@functools.cache
def _register_log_z_fake() -> None:
    torch.library.register_fake("gdrd_fast_C::crd_log_z", lambda anchor, memory, idx, inv_t, offset:
                                anchor.new_empty((), dtype=compute_dtype(anchor)))


# backend -> (anchor, memory, idx, *, temperature, n_data) -> log Z (a 0-dim tensor, accumulation dtype)
LOG_Z_IMPLS = Op("crd_log_z", {
    "torch": Backend(lambda: reference.crd_log_z, backends.anywhere),
    "chunked": Backend(lambda: crd_log_z_chunked, backends.anywhere),
    "cpu": Backend(lambda: crd_log_z_cpu, _log_z_cpu_unavailable),
}, exact="chunked")


def dense_wins(idx: Tensor, memory: Tensor) -> bool:
    """On GPU memory traffic decides: the dense path reads the bank once, the gathered one B(K+1) rows.
    On CPU the per-score work does (B x N dense scores against B(K+1) gathered ones)."""
    if memory.is_cuda:
        return idx.numel() >= 2 * memory.shape[0]
    return idx.shape[1] >= 2 * memory.shape[0]


def dense_forward(anchor: Tensor, memory: Tensor, idx: Tensor, inv_t: float, log_z: Tensor, c: float, eps: float,
                  need_grad: bool) -> tuple[Tensor, Tensor]:
    """crd_nce_forward's contract from all B x N scores: negatives weighted by their per-row sample counts."""
    dt = compute_dtype(anchor)
    a, m, idx = anchor.to(dt), memory.to(dt), idx.long()
    negatives = idx.shape[1] - 1
    counts = torch.zeros(a.shape[0], m.shape[0], dtype=dt, device=a.device)
    counts.scatter_add_(1, idx[:, 1:], torch.ones(idx[:, 1:].shape, dtype=dt, device=a.device))
    shift = log_z.to(dt) + math.log(c + eps)
    logits = (a @ m.t()) * inv_t - shift  # [B, N]
    positive = (a * m[idx[:, 0]]).sum(1) * inv_t - shift
    zero = logits.new_zeros(())
    rows = (torch.logaddexp(-positive, zero) + (counts * torch.logaddexp(logits, zero)).sum(1)
            + negatives * math.log1p(eps / c))
    if not need_grad:
        return rows, rows.new_empty(0)
    grad = ((counts * torch.sigmoid(logits)) @ m + (torch.sigmoid(positive) - 1)[:, None] * m[idx[:, 0]]) * inv_t
    return rows, grad


def _crd_nce_forward(anchor: Tensor, memory: Tensor, idx: Tensor, log_z: Tensor, temperature: float, c: float,
                     eps: float, backend: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    forward = dense_forward if dense_wins(idx, memory) else IMPLS[backend].kernel()
    rows, grad = forward(anchor, memory, idx, 1.0 / temperature, log_z, c, eps, need_grad)
    return rows, grad


@torch.library.custom_op("gdrd_fast::crd_nce", mutates_args=())
def crd_nce_op(anchor: Tensor, memory: Tensor, idx: Tensor, log_z: Tensor, temperature: float, c: float,
               eps: float, backend: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(row losses [B], d row_b / d anchor_b) in the accumulation dtype."""
    return _crd_nce_forward(anchor, memory, idx, log_z, temperature, c, eps, backend, need_grad)


def _fake_side(anchor: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    dt = compute_dtype(anchor)
    return (anchor.new_empty(anchor.shape[0], dtype=dt),
            anchor.new_empty(tuple(anchor.shape) if need_grad else (0,), dtype=dt))


@crd_nce_op.register_fake
def _(anchor, memory, idx, log_z, temperature, c, eps, backend, need_grad):
    return _fake_side(anchor, need_grad)


def _scaled(grad_anchor: Tensor, grad_rows: Tensor, dtype: torch.dtype) -> Tensor:
    if grad_anchor.numel() == 0:
        raise RuntimeError("crd_nce: backward through a forward run with need_grad=False")
    return (grad_anchor * grad_rows[:, None].to(grad_anchor.dtype)).to(dtype)


def _setup_context(ctx, inputs, output):
    ctx.anchor_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, _grad):
    (grad_anchor,) = ctx.saved_tensors
    return _scaled(grad_anchor, grad_rows, ctx.anchor_dtype), None, None, None, None, None, None, None, None


crd_nce_op.register_autograd(_backward, setup_context=_setup_context)


# crd_nce_op's inputs -> its outputs, through its eager twin outside torch.compile
crd_nce = eager_twin(crd_nce_op, _crd_nce_forward, _setup_context, _backward)


@torch.library.custom_op("gdrd_fast::crd_nce_pair", mutates_args=())
def crd_nce_pair_op(anchor_a: Tensor, memory_a: Tensor, log_z_a: Tensor, anchor_b: Tensor, memory_b: Tensor,
                    log_z_b: Tensor, idx: Tensor, temperature: float, c: float, eps: float, backend: str,
                    need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both sides' (row losses, d row / d anchor): anchor_a against memory_a, anchor_b against memory_b."""
    return _crd_nce_pair_forward(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, temperature, c, eps,
                                 backend, need_grad)


def _crd_nce_pair_forward(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, temperature, c, eps,
                          backend, need_grad):
    inv_t = 1.0 / temperature
    if dense_wins(idx, memory_a):
        return (*dense_forward(anchor_a, memory_a, idx, inv_t, log_z_a, c, eps, need_grad),
                *dense_forward(anchor_b, memory_b, idx, inv_t, log_z_b, c, eps, need_grad))
    return tuple(PAIR_IMPLS[backend].kernel()(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, inv_t,
                                            c, eps, need_grad))


@crd_nce_pair_op.register_fake
def _(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, temperature, c, eps, backend, need_grad):
    return (*_fake_side(anchor_a, need_grad), *_fake_side(anchor_b, need_grad))


def _pair_setup_context(ctx, inputs, output):
    ctx.anchor_dtypes = inputs[0].dtype, inputs[3].dtype
    ctx.save_for_backward(output[1], output[3])


def _pair_backward(ctx, grad_rows_a, _grad_a, grad_rows_b, _grad_b):
    grad_anchor_a, grad_anchor_b = ctx.saved_tensors
    return (_scaled(grad_anchor_a, grad_rows_a, ctx.anchor_dtypes[0]), None, None,
            _scaled(grad_anchor_b, grad_rows_b, ctx.anchor_dtypes[1]), None, None, None, None, None, None, None, None)


crd_nce_pair_op.register_autograd(_pair_backward, setup_context=_pair_setup_context)


crd_nce_pair = eager_twin(crd_nce_pair_op, _crd_nce_pair_forward, _pair_setup_context, _pair_backward)
