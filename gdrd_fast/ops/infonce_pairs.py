"""infonce_bank_loss with in-batch keys, labels and cosine scores: the fast paths (docs/ops/infonce.md).

Without labels the bank still goes through the fused single-pass kernel (gdrd_fast.ops.infonce); the
small B x B in-batch block is computed densely and merged into each row's log-sum-exp by log-add-exp.
With labels, a bank row of the query's class is a positive rather than a negative, so the negative
log-sum-exp needs a label mask and every such row is a pair of its own: two chunked passes over the
bank (masked log-sum-exp, then the positive pairs), each returning its query gradient from the same
pass, never holding B x K.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from ..backends import Backend, Op
from ..numerics import compute_dtype
from . import infonce


def _keys(bank: Tensor, start: int, stop: int, dt: torch.dtype, normalize: bool) -> Tensor:
    keys = bank[start:stop].to(dt)
    return F.normalize(keys, dim=1) if normalize else keys


class _MaskedBankLogSumExp(torch.autograd.Function):
    """lse[b] = logsumexp over bank rows j with bank_labels[j] != labels[b] of <q_b, k_j> / T (-inf if none)."""

    @staticmethod
    def forward(ctx, q, bank, labels, bank_labels, inv_t, normalize):
        b = q.shape[0]
        row_max = torch.full((b,), -math.inf, dtype=q.dtype, device=q.device)
        row_sum = torch.zeros_like(row_max)
        weighted = torch.zeros_like(q)
        chunk = infonce.default_chunk(b)
        for start in range(0, bank.shape[0], chunk):
            keys = _keys(bank, start, start + chunk, q.dtype, normalize)
            s = torch.mm(q, keys.t()).mul_(inv_t)
            s.masked_fill_(labels[:, None] == bank_labels[None, start:start + chunk], -math.inf)
            new_max = torch.maximum(row_max, s.amax(1))
            shift = torch.where(torch.isinf(new_max), 0.0, new_max)  # rows with no negative yet
            rescale = torch.exp(row_max - shift)
            s.sub_(shift[:, None]).exp_()
            row_sum.mul_(rescale).add_(s.sum(1))
            weighted.mul_(rescale[:, None]).addmm_(s, keys)
            row_max = new_max
        found = row_sum > 0
        lse = torch.where(found, row_max + torch.log(row_sum), -math.inf)
        grad_q = torch.where(found[:, None], weighted / row_sum.clamp_min(1e-300)[:, None], 0.0) * inv_t
        ctx.save_for_backward(grad_q)
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        (grad_q,) = ctx.saved_tensors
        return grad_q * grad_lse[:, None], None, None, None, None, None


class _BankPositivePairs(torch.autograd.Function):
    """(sum over bank rows j of the query's class of softplus(lse[b] - <q_b, k_j> / T), their count)."""

    @staticmethod
    def forward(ctx, q, lse, bank, labels, bank_labels, inv_t, normalize):
        b = q.shape[0]
        total = torch.zeros(b, dtype=q.dtype, device=q.device)
        grad_lse = torch.zeros_like(total)
        grad_q = torch.zeros_like(q)
        count = torch.zeros(b, dtype=torch.long, device=q.device)
        chunk = infonce.default_chunk(b)
        for start in range(0, bank.shape[0], chunk):
            keys = _keys(bank, start, start + chunk, q.dtype, normalize)
            same = labels[:, None] == bank_labels[None, start:start + chunk]
            x = lse[:, None] - torch.mm(q, keys.t()).mul_(inv_t)
            total += torch.where(same, reference.softplus(x), 0.0).sum(1)
            weight = torch.where(same, torch.sigmoid(x), 0.0)
            grad_lse += weight.sum(1)
            grad_q.addmm_(weight, keys, alpha=-inv_t)
            count += same.sum(1)
        ctx.save_for_backward(grad_q, grad_lse)
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    def backward(ctx, grad_total, _grad_count):
        grad_q, grad_lse = ctx.saved_tensors
        return grad_q * grad_total[:, None], grad_lse * grad_total, None, None, None, None, None


def _logaddexp(a: Tensor, b: Tensor) -> Tensor:
    """logaddexp that stays -inf, with a zero (not NaN) gradient, where both sides are -inf."""
    empty = torch.isinf(a) & torch.isinf(b)
    return torch.logaddexp(a.masked_fill(empty, 0.0), b.masked_fill(empty, 0.0)).masked_fill(empty, -math.inf)


def _masked_logsumexp(s: Tensor, mask: Tensor) -> Tensor:
    has = mask.any(1)
    lse = torch.logsumexp(s.masked_fill(~mask, -math.inf).masked_fill(~has[:, None], 0.0), 1)
    return lse.masked_fill(~has, -math.inf)


def pair_rows(query: Tensor, positive: Tensor | None, bank: Tensor, batch_negatives: Tensor | None,
              labels: Tensor | None, bank_labels: Tensor | None, temperature: float, normalize: bool,
              kernel: str, need_grad: bool) -> tuple[Tensor, Tensor | int]:
    """(per-query loss [B] in the accumulation dtype, number of (query, positive) pairs)."""
    b = query.shape[0]
    inv_t = 1.0 / temperature
    if labels is None:
        # one positive per row: the bank stays in the fused kernel, the B x B block is merged after it
        dt = compute_dtype(query)

        def prep(x: Tensor) -> Tensor:
            """Cosine inputs are normalised in the accumulation dtype; the Triton kernel then takes them in
            their own storage dtype (its operand precision), the chunked path keeps them in dt."""
            if not normalize:
                return x
            unit = F.normalize(x.to(dt), dim=1)
            return unit.to(x.dtype) if kernel == "triton" else unit

        q, p = prep(query), prep(positive)
        s_pos = (q.to(dt) * p.to(dt)).sum(1) * inv_t
        lse = s_pos
        if bank.shape[0]:
            rows = infonce.infonce_bank(q, p, prep(bank.detach()), temperature, kernel, need_grad)[0]
            lse = rows + s_pos
        if batch_negatives is not None and b > 1:
            n = prep(batch_negatives)
            s = (q.to(dt) @ n.to(dt).t()).mul(inv_t)
            lse = torch.logaddexp(lse, torch.logsumexp(s.masked_fill(torch.eye(b, dtype=torch.bool,
                                                                            device=s.device), -math.inf), 1))
        return lse - s_pos, b

    dt = compute_dtype(query)
    q = F.normalize(query.to(dt), dim=1) if normalize else query.to(dt)
    lse = torch.full((b,), -math.inf, dtype=dt, device=q.device)
    if bank.shape[0]:
        lse = _MaskedBankLogSumExp.apply(q, bank.detach(), labels, bank_labels, inv_t, normalize)
    in_batch = None
    if batch_negatives is not None:
        n = F.normalize(batch_negatives.to(dt), dim=1) if normalize else batch_negatives.to(dt)
        s = (q @ n.t()).mul(inv_t)
        other = ~torch.eye(b, dtype=torch.bool, device=q.device)
        same = labels[:, None] == labels[None]
        in_batch = (s, other & same)
        lse = _logaddexp(lse, _masked_logsumexp(s, other & ~same))
    rows = q.new_zeros(b)
    count = torch.zeros((), dtype=torch.long, device=q.device)
    if positive is not None:
        p = F.normalize(positive.to(dt), dim=1) if normalize else positive.to(dt)
        rows = rows + reference.softplus(lse - (q * p).sum(1) * inv_t)
        count = count + b
    if bank.shape[0]:
        total, per_query = _BankPositivePairs.apply(q, lse, bank.detach(), labels, bank_labels, inv_t, normalize)
        rows = rows + total
        count = count + per_query.sum()
    if in_batch is not None:
        s, pos = in_batch
        rows = rows + torch.where(pos, reference.softplus(lse[:, None] - s), 0.0).sum(1)
        count = count + pos.sum()
    return rows, count


def _pair_rows(query, positive, bank, *, temperature, batch_negatives, labels, bank_labels, normalize, kernel):
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (query, positive, batch_negatives))
    return pair_rows(query, positive, bank, batch_negatives, labels, bank_labels, temperature, normalize, kernel,
                     need_grad)


# backend -> (query, positive, bank, *, temperature, batch_negatives, labels, bank_labels, normalize)
#            -> (per-query sums [B], number of pairs): the bank pass runs on infonce's kernels, so the
# declarations are infonce's
IMPLS = Op("infonce_bank_pairs_loss", {
    "torch": Backend(lambda: reference.infonce_bank_pairs_rows, backends.anywhere),
    **{name: dataclasses.replace(infonce.IMPLS[name], load=lambda name=name: functools.partial(_pair_rows, kernel=name))
       for name in ("chunked", "triton")},
}, exact="chunked", aliases={"cpu": "chunked"}, reference_below=backends.SMALL_CALL_ELEMENTS)
