"""infonce_bank_loss: custom op, autograd and the chunked backend (docs/ops/infonce.md)."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import backends, reference
from ..backends import Backend, Op
from ._twin import eager_twin
from ..numerics import compute_dtype


def default_chunk(batch: int) -> int:
    """Bank rows per block: each score block near 2M elements (8 MB in fp32)."""
    return min(16384, max(1024, (1 << 21) // batch))


def one_block_loss(query: Tensor, positive: Tensor, bank: Tensor, temperature: float,
                   reduction: str) -> Tensor | None:
    """The chunked backend's loss for an eager CPU call whose bank is one block, through its C++ autograd node
    (csrc/autograd/one_block.cpp: one node, the reduction folded in); None where that does not apply: under
    torch.compile, off CPU, a larger bank, or a build without the node."""
    if not query.is_cpu or bank.shape[0] > default_chunk(query.shape[0]) or torch.compiler.is_compiling():
        return None
    node = backends.compiled_op("infonce_bank_one_block")
    if node is None:
        return None
    return node(query, positive, bank, 1.0 / temperature, backends.REDUCTION_CODES[reduction])


def infonce_bank_chunked(query: Tensor, positive: Tensor, bank: Tensor, temperature: float,
                         need_grad: bool, chunk: int | None = None, *, need_rank: bool = False):
    """Online log-sum-exp over bank chunks; dQuery (and, with need_rank, each row's rank: the bank rows
    scoring strictly above its positive) accumulated in the same pass. Never holds B x K.

    The default chunk (default_chunk) keeps each score block near 2M elements: few enough ops that
    per-op threading overhead stays small on a busy CPU, small enough to stay far below B x K.
    """
    if chunk is None:
        chunk = default_chunk(query.shape[0])
    dt = compute_dtype(query)
    q, p = query.to(dt), positive.to(dt)
    inv_t = 1.0 / temperature
    pos = (q * p).sum(1) * inv_t
    if bank.shape[0] <= chunk:
        return _one_block(q, p, bank.to(dt), pos, inv_t, need_grad, need_rank)
    row_max = pos.clone()
    row_sum = torch.ones_like(pos)
    weighted = torch.zeros_like(q) if need_grad else None
    rank = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    for start in range(0, bank.shape[0], chunk):
        keys = bank[start:start + chunk].to(dt)
        s = torch.mm(q, keys.t()).mul_(inv_t)
        if need_rank:
            rank += (s > pos[:, None]).sum(1)
        new_max = torch.maximum(row_max, s.amax(1))
        rescale = torch.exp(row_max - new_max)
        s.sub_(new_max[:, None]).exp_()
        row_sum.mul_(rescale).add_(s.sum(1))
        if need_grad:
            weighted.mul_(rescale[:, None]).addmm_(s, keys)
        row_max = new_max
    lse = row_max + torch.log(row_sum)
    rows = lse - pos
    rank = rank if need_rank else rank.new_empty(0)
    if not need_grad:
        return rows, q.new_empty(0), q.new_empty(0), rank
    pos_weight_minus_one = (torch.exp(pos - lse) - 1)[:, None]
    grad_query = (weighted / row_sum[:, None] + pos_weight_minus_one * p) * inv_t
    grad_positive = pos_weight_minus_one * q * inv_t
    return rows, grad_query, grad_positive, rank


def _one_block(q: Tensor, p: Tensor, keys: Tensor, pos: Tensor, inv_t: float, need_grad: bool,
               need_rank: bool):
    """infonce_bank_chunked for a bank of one chunk: one softmax instead of the running rescale (half the
    torch calls, which is what a small call costs). The loss is -log_softmax at the positive (column 0):
    on CPU one log_softmax costs a sixth of the host time of torch.logsumexp."""
    logits = torch.cat([pos[:, None], torch.mm(q, keys.t()).mul_(inv_t)], 1)
    rank = ((logits[:, 1:] > pos[:, None]).sum(1) if need_rank
            else torch.empty(0, dtype=torch.int64, device=q.device))
    log_weight = torch.log_softmax(logits, 1)
    rows = log_weight[:, 0].neg()
    if not need_grad:
        return rows, q.new_empty(0), q.new_empty(0), rank
    weight = log_weight.exp_()
    pos_weight_minus_one = weight[:, :1] - 1
    grad_query = torch.addmm(pos_weight_minus_one * p, weight[:, 1:], keys).mul_(inv_t)
    return rows, grad_query, pos_weight_minus_one * q * inv_t, rank


def _triton():
    return backends.kernels().infonce.infonce_bank_forward


def _triton_max_sizes(dtype: torch.dtype) -> dict[str, int]:
    """The widest feature dim with a spill-free tile: fp32-accurate products need narrower tiles."""
    return {"d": backends.kernels().infonce.max_d(dtype)}


def infonce_bank_rows(query: Tensor, positive: Tensor, bank: Tensor, *, temperature: float, kernel: str,
                      return_rank: bool = False):
    """Per-row losses [B] in the accumulation dtype from a kernel, with autograd to query and positive;
    return_rank: (rows, rank [B] int64), rank counted in the same pass (reference.infonce_bank_rows)."""
    need_grad = torch.is_grad_enabled() and (query.requires_grad or positive.requires_grad)
    rows, _, _, rank = infonce_bank(query, positive, bank, temperature, kernel, need_grad, return_rank)
    return (rows, rank) if return_rank else rows


# backend -> (query, positive, bank, *, temperature) -> rows [B]; `kernel` is what infonce_bank_op runs.
# float64, and fp32 wider than any spill-free tile, run the exact chunked stream (on any device)
IMPLS = Op("infonce_bank_loss", {
    "torch": Backend(lambda: reference.infonce_bank_rows, backends.anywhere),
    "chunked": Backend(lambda: functools.partial(infonce_bank_rows, kernel="chunked"), backends.anywhere,
                       kernel=lambda: infonce_bank_chunked, one_block=one_block_loss),
    "triton": Backend(lambda: functools.partial(infonce_bank_rows, kernel="triton"), backends.with_triton,
                      dtypes=(torch.float16, torch.bfloat16, torch.float32), max_sizes=_triton_max_sizes,
                      kernel=_triton),
}, exact="chunked", aliases={"cpu": "chunked"})


@torch.library.custom_op("gdrd_fast::infonce_bank", mutates_args=())
def infonce_bank_op(query: Tensor, positive: Tensor, bank: Tensor, temperature: float, backend: str,
                    need_grad: bool, need_rank: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row losses [B], d row_b / d query_b, d row_b / d positive_b) in the accumulation dtype, and
    rank [B] int64 (empty unless need_rank)."""
    return _infonce_bank_forward(query, positive, bank, temperature, backend, need_grad, need_rank)


def _infonce_bank_forward(query, positive, bank, temperature, backend, need_grad, need_rank):
    return IMPLS[backend].kernel()(query, positive, bank, temperature, need_grad, need_rank=need_rank)


@infonce_bank_op.register_fake
def _(query, positive, bank, temperature, backend, need_grad, need_rank=False):
    dt = compute_dtype(query)
    grad_shape = tuple(query.shape) if need_grad else (0,)
    return (query.new_empty(query.shape[0], dtype=dt), query.new_empty(grad_shape, dtype=dt),
            query.new_empty(grad_shape, dtype=dt),
            query.new_empty(query.shape[0] if need_rank else 0, dtype=torch.int64))


def _setup_context(ctx, inputs, output):
    query, positive = inputs[0], inputs[1]
    ctx.dtypes = (query.dtype, positive.dtype)
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad_rows, _gq, _gp, _rank):
    grad_query, grad_positive = ctx.saved_tensors
    if grad_query.numel() == 0:
        raise RuntimeError("infonce_bank: backward through a forward run with need_grad=False")
    scale = grad_rows[:, None].to(grad_query.dtype)
    gq = gp = None
    if ctx.needs_input_grad[0]:
        gq = (grad_query * scale).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        gp = (grad_positive * scale).to(ctx.dtypes[1])
    return gq, gp, None, None, None, None, None


infonce_bank_op.register_autograd(_backward, setup_context=_setup_context)


_infonce_bank_twin = eager_twin(infonce_bank_op, _infonce_bank_forward, _setup_context, _backward)


def infonce_bank(query: Tensor, positive: Tensor, bank: Tensor, temperature: float, backend: str,
                 need_grad: bool, need_rank: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """infonce_bank_op's outputs, through its eager twin outside torch.compile."""
    return _infonce_bank_twin(query, positive, bank, temperature, backend, need_grad, need_rank)
