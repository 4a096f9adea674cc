"""infonce_bank_loss: custom op, autograd and the chunked CPU backend (ops.md section 2)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from ..backends import Impl
from ..reference import compute_dtype


def infonce_bank_chunked(query: Tensor, positive: Tensor, bank: Tensor, temperature: float,
                         need_grad: bool, chunk: int | None = None):
    """Online log-sum-exp over bank chunks; dQuery accumulated in the same pass. Never holds B x K.

    The default chunk keeps each score block near 2M elements (8 MB in fp32): few enough ops that
    per-op threading overhead stays small on a busy CPU, small enough to stay far below B x K.
    """
    if chunk is None:
        chunk = min(16384, max(1024, (1 << 21) // query.shape[0]))
    dt = compute_dtype(query)
    q, p = query.to(dt), positive.to(dt)
    inv_t = 1.0 / temperature
    pos = (q * p).sum(1) * inv_t
    row_max = pos.clone()
    row_sum = torch.ones_like(pos)
    weighted = torch.zeros_like(q) if need_grad else None
    for start in range(0, bank.shape[0], chunk):
        keys = bank[start:start + chunk].to(dt)
        s = torch.mm(q, keys.t()).mul_(inv_t)
        new_max = torch.maximum(row_max, s.amax(1))
        rescale = torch.exp(row_max - new_max)
        s.sub_(new_max[:, None]).exp_()
        row_sum.mul_(rescale).add_(s.sum(1))
        if need_grad:
            weighted.mul_(rescale[:, None]).addmm_(s, keys)
        row_max = new_max
    lse = row_max + torch.log(row_sum)
    rows = lse - pos
    if not need_grad:
        return rows, q.new_empty(0), q.new_empty(0)
    pos_weight_minus_one = (torch.exp(pos - lse) - 1)[:, None]
    grad_query = (weighted / row_sum[:, None] + pos_weight_minus_one * p) * inv_t
    grad_positive = pos_weight_minus_one * q * inv_t
    return rows, grad_query, grad_positive


def _triton():
    return backends.kernels().infonce.infonce_bank_forward


IMPLS = {
    "cpu": Impl(lambda: infonce_bank_chunked, backends.on_cpu),
    "triton": Impl(_triton, backends.with_triton),
}


@torch.library.custom_op("gdrd_fast::infonce_bank", mutates_args=())
def infonce_bank_op(query: Tensor, positive: Tensor, bank: Tensor, temperature: float, backend: str,
                    need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(row losses [B], d row_b / d query_b, d row_b / d positive_b), in the accumulation dtype."""
    rows, gq, gp = IMPLS[backend].load()(query, positive, bank, temperature, need_grad)
    return rows, gq, gp


@infonce_bank_op.register_fake
def _(query, positive, bank, temperature, backend, need_grad):
    dt = compute_dtype(query)
    grad_shape = tuple(query.shape) if need_grad else (0,)
    return (query.new_empty(query.shape[0], dtype=dt), query.new_empty(grad_shape, dtype=dt),
            query.new_empty(grad_shape, dtype=dt))


def _setup_context(ctx, inputs, output):
    query, positive = inputs[0], inputs[1]
    ctx.dtypes = (query.dtype, positive.dtype)
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_rows, _gq, _gp):
    grad_query, grad_positive = ctx.saved_tensors
    if grad_query.numel() == 0:
        raise RuntimeError("infonce_bank: backward through a forward run with need_grad=False")
    scale = grad_rows[:, None].to(grad_query.dtype)
    gq = gp = None
    if ctx.needs_input_grad[0]:
        gq = (grad_query * scale).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        gp = (grad_positive * scale).to(ctx.dtypes[1])
    return gq, gp, None, None, None, None


infonce_bank_op.register_autograd(_backward, setup_context=_setup_context)
