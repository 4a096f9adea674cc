"""feature_regression_loss: custom ops, autograd and the chunked backend (docs/ops/feature_regression.md).

Every backend sees the inputs as columns: x [B, Cs, P] and teacher [B, Ct, P] (P pixels per sample,
1 for [N, C] features) and returns per-sample mean squared errors [B]. A forward whose error
(projection - teacher) fits one chunk keeps it for the backward, which then skips one GEMM; a larger one
keeps nothing and the backward recomputes the projection chunk by chunk, so the memory held between the
passes stays bounded by one chunk.
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
# the largest error [B, Ct, P] the C++ node takes: its batched product broadcasts the weight, which bmm copies
# per sample (16 MiB at B = 16, Ct = Cs = 512); up to here that copy is small, and host time is what counts
_NODE_ELEMENTS = 1 << 14


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
    """projection - teacher [B, Ct, P] for inputs that fit one chunk: the projection as one 1x1 convolution
    (a single torch call however B and P compare, where per-sample products run narrow on a few pixels and a
    folded product copies both operands)."""
    return torch.conv1d(x.to(w.dtype), w.unsqueeze(2), bias).sub_(teacher)


def _keeps_error(b: int, ct: int, p: int) -> bool:
    """Whether the chunked forward keeps its error [B, Ct, P] for the backward: only when it is one chunk."""
    return b * ct * p <= _CHUNK_ELEMENTS


def chunked_forward(x: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """(rows [B], kept error [B, Ct, P] when it fits one chunk, else an empty tensor)."""
    dt = compute_dtype(x)
    b, _, p = x.shape
    ct = weight.shape[0]
    w, bias_dt = weight.to(dt), (bias.to(dt) if bias is not None else None)
    if _keeps_error(b, ct, p):  # one block: a few torch calls, which is what a small call costs
        err = _one_block_error(x, teacher, w, bias_dt)
        return err.square().sum((1, 2)).div_(ct * p), err
    rows = torch.zeros(b, dtype=dt, device=x.device)
    for samples, pixels in _chunks(b, ct, p):
        _, err = _chunk_error(x, teacher, w, bias_dt, samples, pixels)
        rows[samples] += err.square_().sum(0).view(samples.stop - samples.start, -1).sum(1)
    return rows / (ct * p), rows.new_empty(0)


def chunked_backward(grad_rows: Tensor, x: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None,
                     kept_error: Tensor):
    """Gradients from the forward's kept error when it has one (three GEMMs become two), else recomputed."""
    dt = compute_dtype(x)
    b, cs, p = x.shape
    ct = weight.shape[0]
    w, bias_dt = weight.to(dt), (bias.to(dt) if bias is not None else None)
    sample_grad = grad_rows.to(dt) * (2.0 / (ct * p))
    if _keeps_error(b, ct, p):
        err = kept_error if kept_error.numel() else _one_block_error(x, teacher, w, bias_dt)
        # the three gradients of the 1x1 convolution in one torch call; err * sample_grad is not in place: the
        # kept error may serve another backward
        grad_x, grad_w, grad_bias = torch.ops.aten.convolution_backward.default(
            err * sample_grad[:, None, None], x.to(dt), w.unsqueeze(2), [ct] if bias is not None else None,
            [1], [0], [1], False, [0], 1, [True, True, bias is not None])
        return grad_x, grad_w.view(ct, cs), grad_bias
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
    """The Triton kernels keep no error: the forward returns an empty one and the backward recomputes."""
    module = backends.kernels().feature_regression

    def forward(x, teacher, weight, bias):
        return module.feature_regression_forward(x, teacher, weight, bias), x.new_empty(0)

    def backward(grad_rows, x, teacher, weight, bias, kept_error):
        return module.feature_regression_backward(grad_rows, x, teacher, weight, bias)

    return forward, backward


@torch.library.custom_op("gdrd_fast::feature_regression", mutates_args=())
def feature_regression_op(x: Tensor, teacher: Tensor, weight: Tensor, bias: Optional[Tensor],
                          backend: str) -> tuple[Tensor, Tensor]:
    """(per-sample mean squared error [B] of conv1x1(x) against teacher, error kept for the backward or an
    empty tensor), in the accumulation dtype."""
    return IMPLS[backend].kernel()[0](x, teacher, weight, bias)


@feature_regression_op.register_fake
def _(x, teacher, weight, bias, backend):
    dt = compute_dtype(x)
    b, _, p = x.shape
    ct = weight.shape[0]
    kept = (b, ct, p) if IMPLS[backend] is IMPLS["chunked"] and _keeps_error(b, ct, p) else (0,)
    return x.new_empty(b, dtype=dt), x.new_empty(kept, dtype=dt)


def _backward_kernel(grad_rows, x, teacher, weight, bias, kept_error, backend) -> tuple[Tensor, Tensor, Tensor]:
    grad_x, grad_w, grad_bias = IMPLS[backend].kernel()[1](grad_rows, x, teacher, weight, bias, kept_error)
    return grad_x, grad_w, grad_bias if grad_bias is not None else grad_w.new_empty(0)


@torch.library.custom_op("gdrd_fast::feature_regression_backward", mutates_args=())
def feature_regression_backward_op(grad_rows: Tensor, x: Tensor, teacher: Tensor, weight: Tensor,
                                   bias: Optional[Tensor], kept_error: Tensor,
                                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias or an empty tensor without bias), in the accumulation dtype."""
    return _backward_kernel(grad_rows, x, teacher, weight, bias, kept_error, backend)


@feature_regression_backward_op.register_fake
def _(grad_rows, x, teacher, weight, bias, kept_error, backend):
    dt = compute_dtype(x)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(weight.shape, dtype=dt),
            x.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=dt))


def _setup_context(ctx, inputs, output):
    x, teacher, weight, bias, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x, teacher, weight, bias, output[1])


def _backward(ctx, grad_rows, backward=feature_regression_backward_op):
    """The custom op's backward runs the backward custom op (what torch.compile traces); the eager twin
    passes the kernel itself."""
    x, teacher, weight, bias, kept_error = ctx.saved_tensors
    grad_x, grad_w, grad_bias = backward(grad_rows, x, teacher, weight, bias, kept_error, ctx.backend)
    return (grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None, None,
            grad_w.to(weight.dtype) if ctx.needs_input_grad[2] else None,
            grad_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None, None)


def _op_backward(ctx, grad_rows, grad_kept_error):
    """The kept error is no loss term: its gradient (None or zeros) is dropped."""
    return _backward(ctx, grad_rows)


feature_regression_op.register_autograd(_op_backward, setup_context=_setup_context)


class _FeatureRegression(torch.autograd.Function):
    """feature_regression_op's eager twin: the same kernels and backward without torch.library's dispatch."""

    @staticmethod
    def forward(ctx, x, teacher, weight, bias, backend):
        rows, kept_error = IMPLS[backend].kernel()[0](x, teacher, weight, bias)
        _setup_context(ctx, (x, teacher, weight, bias, backend), (rows, kept_error))
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        return _backward(ctx, grad_rows, _backward_kernel)


def one_block_loss(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None,
                   reduction: str) -> Tensor | None:
    """The chunked backend's loss for an eager CPU call of one block through its C++ autograd node
    (csrc/autograd/one_block.cpp: one node, the reduction folded in); None where that does not apply: under
    torch.compile, off CPU, above _NODE_ELEMENTS, or in a build without the node. The teacher has no gradient
    (the functional refuses one that has)."""
    b = student.shape[0]
    if (torch.compiler.is_compiling() or not student.is_cpu
            or b * weight.shape[0] * (student.numel() // (b * student.shape[1])) > _NODE_ELEMENTS):
        return None
    node = backends.compiled_op("feature_regression_one_block")
    if node is None:
        return None
    return node(student, teacher, weight, bias, backends.REDUCTION_CODES[reduction])


def feature_regression_rows(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None, *,
                            kernel: str) -> Tensor:
    """Per-sample mean squared error [B] of conv1x1(student, weight, bias) against teacher (detached).

    student [B, Cs, H, W] or [N, Cs]; weight [Ct, Cs]; fp32 result (fp64 for fp64 inputs), with autograd
    to student, weight and bias.
    """
    x = student.reshape(student.shape[0], student.shape[1], -1).contiguous()
    t = teacher.detach().reshape(teacher.shape[0], teacher.shape[1], -1).contiguous()
    if torch.compiler.is_compiling():
        return feature_regression_op(x, t, weight.contiguous(), bias, kernel)[0]
    return _FeatureRegression.apply(x, t, weight.contiguous(), bias, kernel)


# backend -> (student, teacher, weight, bias) -> per-sample mean squared errors [B]; `kernel` is the
# (forward, backward) pair the custom ops run. The Triton kernels accumulate in fp32: float64 runs the
# exact chunked path (on any device)
IMPLS = Op("feature_regression_loss", {
    "torch": Backend(lambda: reference.feature_regression_rows, backends.anywhere),
    "chunked": Backend(lambda: functools.partial(feature_regression_rows, kernel="chunked"), backends.anywhere,
                       kernel=lambda: (chunked_forward, chunked_backward), one_block=one_block_loss),
    "triton": Backend(lambda: functools.partial(feature_regression_rows, kernel="triton"), backends.with_triton,
                      dtypes=(torch.float16, torch.bfloat16, torch.float32), kernel=_triton),
}, exact="chunked", aliases={"cpu": "chunked"})
