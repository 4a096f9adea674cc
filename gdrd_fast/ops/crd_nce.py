"""crd_nce_loss: custom op and autograd over the compiled gathered kernels (ops.md section 1).

The kernels live in csrc/ (cpu/crd_nce.cpp, cuda/crd_nce.cu) as torch.ops.gdrd_fast_C.crd_nce_forward:
(anchor, memory, idx, inv_t, log_z, c, eps, need_grad) -> (rows [B], d row_b / d anchor_b).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..backends import Impl
from ..reference import compute_dtype


def _compiled():
    return torch.ops.gdrd_fast_C.crd_nce_forward


IMPLS = {
    "cpu": Impl(_compiled, backends.with_compiled_op("crd_nce_forward", backends.with_cpu_extension)),
    "cuda": Impl(_compiled, backends.with_compiled_op("crd_nce_forward", backends.with_cuda_extension)),
}


@torch.library.custom_op("gdrd_fast::crd_nce", mutates_args=())
def crd_nce_op(anchor: Tensor, memory: Tensor, idx: Tensor, log_z: Tensor, temperature: float, c: float,
               eps: float, backend: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(row losses [B], d row_b / d anchor_b) in the accumulation dtype."""
    rows, grad = IMPLS[backend].load()(anchor, memory, idx, 1.0 / temperature, log_z, c, eps, need_grad)
    return rows, grad


@crd_nce_op.register_fake
def _(anchor, memory, idx, log_z, temperature, c, eps, backend, need_grad):
    dt = compute_dtype(anchor)
    return (anchor.new_empty(anchor.shape[0], dtype=dt),
            anchor.new_empty(tuple(anchor.shape) if need_grad else (0,), dtype=dt))


def _setup_context(ctx, inputs, output):
    ctx.anchor_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, _grad):
    (grad_anchor,) = ctx.saved_tensors
    if grad_anchor.numel() == 0:
        raise RuntimeError("crd_nce: backward through a forward run with need_grad=False")
    ga = (grad_anchor * grad_rows[:, None].to(grad_anchor.dtype)).to(ctx.anchor_dtype)
    return ga, None, None, None, None, None, None, None, None


crd_nce_op.register_autograd(_backward, setup_context=_setup_context)
