"""relational_contrastive_loss (CRRCD): the backends, the custom op and its autograd.

IMPLS: backend -> per-row losses, with the signature of reference.relational_rows; LOG_Z_IMPLS: backend ->
the (log_z_t, log_z_s) estimate, reference.relational_log_z's. The 'chunked' and 'triton' entries run
relational_rows / relational_log_z below over their `kernel`.

Decomposition. Keys are stop-grad, so every gradient flows through the per-row queries (small, [R, d])
and the positive scores; plain torch autograd computes those. What is of size R x K, the negative keys
    key_rk = normalize(G relu(A_i - P_n) + g),   n = neg_idx[j, k]
(A_i the projected anchor, P_n the projected queue row, G/g the relation net's last layer folded into
the critic head), is handled by the custom op gdrd_fast::relational_negatives: per row the negative
loss sum_k softplus(<q_r, key_rk>/tau - offset) and its gradient in q_r, or logsumexp_k <q_r, key_rk>/tau.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from ..backends import Backend, Op
from ._twin import eager_twin
from ..numerics import as_dtype, compute_dtype, off_diagonal, pair_indices
from ..params import RelationalParams

EPS = 1e-7  # CRD's eps in log(K / n_data + eps), as in reference.relational_contrastive_loss


def small_call_work(batch: int, negatives: int, relation_dim: int) -> int:
    """The elements of the reference's relation block R x (K + 1) x relation dim, R = B(B - 1), for a call (what
    reference_below compares)."""
    return batch * (batch - 1) * (negatives + 1) * relation_dim


def relational_negatives_chunked(anchors: Tensor, projected: Tensor, neg_idx: Tensor, fold_weight: Tensor,
                                 fold_bias: Tensor, queries: Tensor, offset: Tensor, temperature: float,
                                 need_grad: bool, log_sum_exp: bool, max_elements: int = 1 << 19):
    """The 'chunked' backend: the kernel's computation in torch, over chunks of rows (never R x K x d at once)."""
    batch, dim = anchors.shape
    rows_n, num_neg = queries.shape[0], neg_idx.shape[1]
    i_all, j_all = pair_indices(batch, anchors.device)
    inv_t = 1.0 / temperature
    chunk = max(1, max_elements // (num_neg * dim))
    rows = queries.new_empty(rows_n)
    grad = queries.new_empty((rows_n, dim) if need_grad else (0,))
    for start in range(0, rows_n, chunk):
        i, j = i_all[start:start + chunk], j_all[start:start + chunk]
        u = projected[neg_idx[j]].neg_().add_(anchors[i][:, None, :]).relu_()     # [c, K, d]
        z = torch.matmul(u, fold_weight.t()).add_(fold_bias)
        inv_norm = torch.linalg.vector_norm(z, dim=-1).clamp_min_(1e-12).reciprocal_()  # F.normalize's eps
        s = torch.bmm(z, queries[start:start + chunk, :, None])[..., 0].mul_(inv_norm).mul_(inv_t)
        if log_sum_exp:
            rows[start:start + chunk] = torch.logsumexp(s, 1)
            continue
        logit = s.sub_(offset)
        rows[start:start + chunk] = reference.softplus(logit).sum(1)
        if need_grad:  # sum_k sigmoid(l_k) / tau * z_k / |z_k|, the norm folded into the weights
            weight = torch.sigmoid(logit).mul_(inv_norm).mul_(inv_t)
            grad[start:start + chunk] = torch.bmm(weight[:, None, :], z)[:, 0]
    return rows, grad


def _triton():
    return backends.kernels().relational.relational_negatives


def _triton_max_sizes(dtype: torch.dtype) -> dict[str, int]:
    """The widest relation dim with a spill-free tile for the GEMM operands `dtype` runs (_gemm_dtype)."""
    kernel = backends.kernels().relational
    operand = kernel.operand_dtype(_gemm_dtype(dtype))
    widths = [d for d in (1 << n for n in range(4, 12)) if kernel.supports(d, dtype, operand)]
    return {"relation_dim": max(widths, default=0)}


def _backend(rows, log_z, unavailable, **declared) -> tuple[Backend, Backend]:
    """One backend of the loss and of its log Z estimate: the same declarations, two signatures."""
    return Backend(rows, unavailable, **declared), Backend(log_z, unavailable, **declared)


_TRITON = dict(dtypes=(torch.float16, torch.bfloat16, torch.float32), max_sizes=_triton_max_sizes, kernel=_triton)
_BACKENDS = {
    "torch": _backend(lambda: reference.relational_rows, lambda: reference.relational_log_z, backends.anywhere),
    **{name: _backend(lambda name=name: functools.partial(relational_rows, kernel=name),
                      lambda name=name: functools.partial(relational_log_z, kernel=name), unavailable, **declared)
       for name, unavailable, declared in (
           ("chunked", backends.anywhere, dict(kernel=lambda: relational_negatives_chunked)),
           ("triton", backends.with_triton, _TRITON))},
}
# backend -> (e_t, e_s, queue_t, queue_s, neg_idx, params, *, temperature, log_z_t, log_z_s, n_data) -> rows [R];
# `kernel` is what relational_negatives_op runs. The Triton kernel computes in float32 and has tiles up to
# a relation dim: float64 and wider relations run the exact chunked path (any device)
IMPLS = Op("relational_contrastive_loss", {k: v[0] for k, v in _BACKENDS.items()}, exact="chunked",
           aliases={"cpu": "chunked"}, reference_below=backends.SMALL_CALL_ELEMENTS)
# backend -> (e_t, e_s, queue_t, queue_s, neg_idx, params, *, temperature, n_data) -> (log_z_t, log_z_s)
LOG_Z_IMPLS = Op("relational_log_z", {k: v[1] for k, v in _BACKENDS.items()}, exact="chunked",
                 aliases={"cpu": "chunked"}, reference_below=backends.SMALL_CALL_ELEMENTS)


def _negatives_forward(anchors, projected, neg_idx, fold_weight, fold_bias, queries, offset, temperature, backend,
                       need_grad, log_sum_exp) -> tuple[Tensor, Tensor]:
    rows, grad = IMPLS[backend].kernel()(anchors, projected, neg_idx, fold_weight, fold_bias, queries, offset,
                                         temperature, need_grad, log_sum_exp)
    return rows.to(queries.dtype), grad.to(queries.dtype)


@torch.library.custom_op("gdrd_fast::relational_negatives", mutates_args=())
def relational_negatives_op(anchors: Tensor, projected: Tensor, neg_idx: Tensor, fold_weight: Tensor,
                            fold_bias: Tensor, queries: Tensor, offset: Tensor, temperature: float, backend: str,
                            need_grad: bool, log_sum_exp: bool) -> tuple[Tensor, Tensor]:
    """(per-row negative loss or log-sum-exp [R], d rows_r / d queries_r [R, d] or empty), in queries' dtype."""
    return _negatives_forward(anchors, projected, neg_idx, fold_weight, fold_bias, queries, offset, temperature,
                              backend, need_grad, log_sum_exp)


@relational_negatives_op.register_fake
def _(anchors, projected, neg_idx, fold_weight, fold_bias, queries, offset, temperature, backend, need_grad,
      log_sum_exp):
    return (queries.new_empty(queries.shape[0]),
            queries.new_empty(tuple(queries.shape) if need_grad else (0,)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_rows, _grad):
    (grad_queries,) = ctx.saved_tensors
    if grad_queries.numel() == 0 and grad_rows.numel():
        raise RuntimeError("relational_negatives: backward through a forward run with need_grad=False")
    return (None, None, None, None, None, grad_queries * grad_rows[:, None], None, None, None, None, None)


relational_negatives_op.register_autograd(_backward, setup_context=_setup_context)


# relational_negatives_op's inputs -> its outputs, through its eager twin outside torch.compile
relational_negatives = eager_twin(relational_negatives_op, _negatives_forward, _setup_context, _backward)


class _Side(NamedTuple):
    """One side of CRRCD: queries (with grad), positive scores, and what its negative keys are built from."""
    queries: Tensor      # [R, d]
    positive: Tensor     # [R] <q_r, key_r0>
    anchors: Tensor      # [B, d] A_i
    projected: Tensor    # [Q, d] P_n
    fold_weight: Tensor  # [d, d] G
    fold_bias: Tensor    # [d] g


def _sides(e_t, e_s, queue_t, queue_s, params) -> tuple[_Side, _Side]:
    """(student side, teacher side) in the accumulation dtype; see docs/ops/relational.md."""
    dt = compute_dtype(e_s)
    p = RelationalParams(*(as_dtype(t, dt) for t in params))
    e_t, e_s = as_dtype(e_t.detach(), dt), as_dtype(e_s, dt)
    # relations from per-sample projections: W a - W b is projected once per sample, not per pair. The
    # pairs come from the broadcast B x B grid, not x[i] - x[j]: indexing's backward accumulates with
    # atomic adds, so gradients would differ from run to run in the last bits.
    hidden_t = torch.relu(off_diagonal(F.linear(e_t, p.ft_w1, p.ft_b1)[:, None] - F.linear(e_t, p.ft_w1)[None]))
    hidden_ts = torch.relu(off_diagonal(F.linear(e_t, p.fts_u, p.fts_b1)[:, None] - F.linear(e_s, p.fts_v)[None]))
    q_teacher = F.normalize(F.linear(F.linear(hidden_t, p.ft_w2, p.ft_b2), p.h1_w, p.h1_b), dim=1)
    q_student = F.normalize(F.linear(F.linear(hidden_ts, p.fts_w2, p.fts_b2), p.h2_w, p.h2_b), dim=1)
    # each side's positive key is the other side's query, stop-grad
    with torch.no_grad():
        f = RelationalParams(*(t.detach() for t in p))
        student_keys = (F.linear(e_t, f.ft_w1, f.ft_b1), F.linear(queue_t.to(dt), f.ft_w1),
                        f.h1_w @ f.ft_w2, f.h1_w @ f.ft_b2 + f.h1_b)
        teacher_keys = (F.linear(e_t, f.fts_u, f.fts_b1), F.linear(queue_s.to(dt), f.fts_v),
                        f.h2_w @ f.fts_w2, f.h2_w @ f.fts_b2 + f.h2_b)
    student = _Side(q_student, (q_student * q_teacher.detach()).sum(1), *student_keys)
    teacher = _Side(q_teacher, (q_teacher * q_student.detach()).sum(1), *teacher_keys)
    return student, teacher


def _negatives(side: _Side, neg_idx: Tensor, offset: Tensor, temperature: float, backend: str,
               log_sum_exp: bool, gemm_dtype: torch.dtype) -> Tensor:
    need_grad = not log_sum_exp and torch.is_grad_enabled() and side.queries.requires_grad
    fold_weight = side.fold_weight if backend != "triton" else side.fold_weight.to(gemm_dtype)
    rows, _ = relational_negatives(side.anchors, side.projected, neg_idx, fold_weight, side.fold_bias,
                                   side.queries, offset, temperature, backend, need_grad, log_sum_exp)
    return rows


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The Triton GEMM's operand dtype: fp16 inputs run fp16 tensor cores; bf16 and float32 inputs keep
    float32 accuracy (see kernels/relational.py): fp16 operands overflow past 65504, and one bf16
    product misses the bf16 tolerance (G and relu(A - P) rounded to 8 bits, amplified by 1/temperature)."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def relational_rows(e_t, e_s, queue_t, queue_s, neg_idx, params, *, temperature, log_z_t, log_z_s, n_data,
                    kernel):
    """Per-row losses [R] (student side + teacher side) in the accumulation dtype, keys from `kernel`."""
    student, teacher = _sides(e_t, e_s, queue_t, queue_s, params)
    shift = math.log(neg_idx.shape[1] / n_data + EPS)

    def side_rows(side: _Side, log_z: Tensor) -> Tensor:
        offset = (log_z.to(side.queries.dtype) + shift).detach()
        positive = reference.softplus(offset - side.positive / temperature)
        return positive + _negatives(side, neg_idx, offset, temperature, kernel, False, _gemm_dtype(e_s.dtype))

    return side_rows(student, log_z_s) + side_rows(teacher, log_z_t)


def relational_log_z(e_t, e_s, queue_t, queue_s, neg_idx, params, *, temperature, n_data, kernel):
    with torch.no_grad():
        student, teacher = _sides(e_t, e_s, queue_t, queue_s, params)
        count = student.positive.numel() * (neg_idx.shape[1] + 1)

        def estimate(side: _Side) -> Tensor:
            unused = side.queries.new_zeros(())
            negatives = _negatives(side, neg_idx, unused, temperature, kernel, True, _gemm_dtype(e_s.dtype))
            lse = torch.logsumexp(torch.cat([side.positive / temperature, negatives]), 0)
            return lse - math.log(count) + math.log(n_data)

        return estimate(teacher), estimate(student)
