"""feature_regression_loss: custom ops, autograd and the chunked backend (docs/ops/feature_regression.md).

Every backend sees the inputs as columns: x [B, Cs, P] and teacher [B, Ct, P] (P pixels per sample,
1 for [N, C] features) and returns per-sample mean squared errors [B]. The backward recomputes the
projection from x instead of keeping it, so neither pass holds a [B, Ct, P] tensor.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from ..backends import Backend, Op
from ..numerics import compute_dtype

_CHUNK_ELEMENTS = 1 << 18  # projection elements per chunk of the chunked path (1 MiB in fp32)


def _chunks(b: int, ct: int, p: int):
    """(sample slice, pixel slice) blocks of about _CHUNK_ELEMENTS projected values each, within [b, p]."""
    pixels = min(p, max(1, _CHUNK_ELEMENTS // ct))
    samples = max(1, _CHUNK_ELEMENTS // (ct * pixels))
    for b0 in range(0, b, samples):
        for p0 in range(0, p, pixels):
            yield slice(b0, min(b0 + samples, b)), slice(p0, min(p0 + pixels, p))


def _columns(t: Tensor, samples: slice, pixels: slice) -> Tensor:
    """Block [samples, :, pixels] of t [B, C, P] as one [C, samples * pixels] matrix (a view when P = 1)."""
    return t[samples, :, pixels].transpose(0, 1).reshape(t.shape[1], -1)


def _chunk_error(x: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None, samples: slice, pixels: slice):
    """(x block as columns, projection - teacher) for one block, in the accumulation dtype: one GEMM each,
    however many samples the block spans."""
    xs = _columns(x, samples, pixels).to(weight.dtype)
    err = torch.mm(weight, xs)
    if bias is not None:
        err += bias[:, None]
    return xs, err.sub_(_columns(teacher, samples, pixels))


def _one_block_error(x: Tensor, teacher: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """projection - teacher [B, Ct, P] in one batched GEMM, for inputs that fit one chunk."""
    err = torch.matmul(w, x.to(w.dtype))
    if bias is not None:
        err += bias[:, None]
    return err.sub_(teacher)


def chunked_forward(x: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    dt = compute_dtype(x)
    b, _, p = x.shape
    ct = weight.shape[0]
    w, bias_dt = weight.to(dt), (bias.to(dt) if bias is not None else None)
    if b * ct * p <= _CHUNK_ELEMENTS:  # one block: a few torch calls, which is what a small call costs
        return _one_block_error(x, teacher, w, bias_dt).square_().sum((1, 2)).div_(ct * p)
    rows = torch.zeros(b, dtype=dt, device=x.device)
    for samples, pixels in _chunks(b, ct, p):
        _, err = _chunk_error(x, teacher, w, bias_dt, samples, pixels)
        rows[samples] += err.square_().sum(0).view(samples.stop - samples.start, -1).sum(1)
    return rows / (ct * p)


def chunked_backward(grad_rows: Tensor, x: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None):
    dt = compute_dtype(x)
    b, cs, p = x.shape
    ct = weight.shape[0]
    w, bias_dt = weight.to(dt), (bias.to(dt) if bias is not None else None)
    sample_grad = grad_rows.to(dt) * (2.0 / (ct * p))
    if b * ct * p <= _CHUNK_ELEMENTS:
        err = _one_block_error(x, teacher, w, bias_dt).mul_(sample_grad[:, None, None])
        xs = x.to(dt)
        return (torch.matmul(w.t(), err), torch.matmul(err, xs.transpose(1, 2)).sum(0),
                err.sum((0, 2)) if bias is not None else None)
    grad_x = torch.empty(b, cs, p, dtype=dt, device=x.device)
    grad_w = torch.zeros(ct, cs, dtype=dt, device=x.device)
    grad_bias = torch.zeros(ct, dtype=dt, device=x.device) if bias is not None else None
    for samples, pixels in _chunks(b, ct, p):
        xs, err = _chunk_error(x, teacher, w, bias_dt, samples, pixels)
        n_samples = samples.stop - samples.start
        err.mul_(sample_grad[samples].repeat_interleave(err.shape[1] // n_samples))
        grad_x[samples, :, pixels] = torch.mm(w.t(), err).view(cs, n_samples, -1).transpose(0, 1)
        grad_w.addmm_(err, xs.t())
        if grad_bias is not None:
            grad_bias += err.sum(1)
    return grad_x, grad_w, grad_bias


def _triton():
    module = backends.kernels().feature_regression
    return module.feature_regression_forward, module.feature_regression_backward


@torch.library.custom_op("gdrd_fast::feature_regression", mutates_args=())
def feature_regression_op(x: Tensor, teacher: Tensor, weight: Tensor, bias: Optional[Tensor],
                          backend: str) -> Tensor:
    """Per-sample mean squared error [B] of conv1x1(x) against teacher, in the accumulation dtype."""
    return IMPLS[backend].kernel()[0](x, teacher, weight, bias)


@feature_regression_op.register_fake
def _(x, teacher, weight, bias, backend):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x))


def _backward_kernel(grad_rows, x, teacher, weight, bias, backend) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_w, grad_bias = IMPLS[backend].kernel()[1](grad_rows, x, teacher, weight, bias)
    return grad_x, grad_w, grad_bias if grad_bias is not None else grad_w.new_empty(0)


@torch.library.custom_op("gdrd_fast::feature_regression_backward", mutates_args=())
def feature_regression_backward_op(grad_rows: Tensor, x: Tensor, teacher: Tensor, weight: Tensor,
                                   bias: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias or an empty tensor without bias), in the accumulation dtype."""
    return _backward_kernel(grad_rows, x, teacher, weight, bias, backend)


@feature_regression_backward_op.register_fake
def _(grad_rows, x, teacher, weight, bias, backend):
    dt = compute_dtype(x)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(weight.shape, dtype=dt),
            x.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=dt))


def _setup_context(ctx, inputs, output):
    x, teacher, weight, bias, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, teacher, weight, bias)


def _backward(ctx, grad_rows, backward=feature_regression_backward_op):
    """The custom op's backward runs the backward custom op (what torch.compile traces); the eager twin
    passes the kernel itself."""
    x, teacher, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_bias = backward(grad_rows, x, teacher, weight, bias, ctx.backend)
    return (grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None, None,
            grad_w.to(weight.dtype) if ctx.needs_input_grad[2] else None,
            grad_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None, None)


feature_regression_op.register_autograd(_backward, setup_context=_setup_context)


class _FeatureRegression(torch.autograd.Function):
    """feature_regression_op's eager twin: the same kernels and backward without torch.library's dispatch."""

    @staticmethod
    def forward(ctx, x, teacher, weight, bias, backend):
        rows = IMPLS[backend].kernel()[0](x, teacher, weight, bias)
        _setup_context(ctx, (x, teacher, weight, bias, backend), rows)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        return _backward(ctx, grad_rows, _backward_kernel)


def feature_regression_rows(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None, *,
                            kernel: str) -> Tensor:
    """Per-sample mean squared error [B] of conv1x1(student, weight, bias) against teacher (detached).

    student [B, Cs, H, W] or [N, Cs]; weight [Ct, Cs]; fp32 result (fp64 for fp64 inputs), with autograd
    to student, weight and bias.
    """
    x = student.reshape(student.shape[0], student.shape[1], -1).contiguous()
    t = teacher.detach().reshape(teacher.shape[0], teacher.shape[1], -1).contiguous()
    if torch.compiler.is_compiling():
        return feature_regression_op(x, t, weight.contiguous(), bias, kernel)
    return _FeatureRegression.apply(x, t, weight.contiguous(), bias, kernel)


# backend -> (student, teacher, weight, bias) -> per-sample mean squared errors [B]; `kernel` is the
# (forward, backward) pair the custom ops run. The Triton kernels accumulate in fp32: float64 runs the
# exact chunked path (on any device)
IMPLS = Op("feature_regression_loss", {
    "torch": Backend(lambda: reference.feature_regression_rows, backends.anywhere),
    "chunked": Backend(lambda: functools.partial(feature_regression_rows, kernel="chunked"), backends.anywhere,
                       kernel=lambda: (chunked_forward, chunked_backward)),
    "triton": Backend(lambda: functools.partial(feature_regression_rows, kernel="triton"), backends.with_triton,
                      dtypes=(torch.float16, torch.bfloat16, torch.float32), kernel=_triton),
}, exact="chunked", aliases={"cpu": "chunked"})
