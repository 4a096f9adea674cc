"""Ground truth of every gdrd_fast op, in readable PyTorch: the "torch" backend.

Each function materialises what the fast backends avoid (B x K scores, gathered rows, key relations).
Float64 inputs compute in float64, exactly and stably (log-space forms: no logit overflows): that is
what every backend is tested against. Other dtypes accumulate in float32, which gives the tests their
same-dtype baseline (gdrd_fast.testing). Formulas and numerics: docs/ops/ (one page per op).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .numerics import as_dtype, compute_dtype, off_diagonal, pair_indices, reduce_pairs, reduce_rows
from .params import RelationalParams


# ----------------------------------------------------------------------------------------------------
# 1. crd_nce_loss: CRD's NCE critic over gathered rows of an id-indexed memory bank (RepDistiller).
# ----------------------------------------------------------------------------------------------------
def crd_scores(anchor: Tensor, memory: Tensor, idx: Tensor) -> Tensor:
    """s[b, k] = <memory[idx[b, k]], anchor[b]>, materialising the B x (K+1) x D gather."""
    dt = compute_dtype(anchor)
    rows = memory[idx.long()].to(dt)
    return torch.einsum("bkd,bd->bk", rows, anchor.to(dt))


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), exact for every x (torch's F.softplus returns x itself beyond its threshold of 20)."""
    return torch.logaddexp(x, x.new_zeros(()))


def log_z_like(log_z, s: Tensor) -> Tensor:
    """log Z (a float or a tensor) in the dtype and on the device of the scores (a float never passes
    through the default dtype, float32)."""
    if isinstance(log_z, Tensor):
        return log_z if log_z.dtype == s.dtype and log_z.device == s.device else log_z.to(s.device, s.dtype)
    return torch.tensor(float(log_z), dtype=s.dtype, device=s.device)


def crd_nce_rows(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07, log_z,
                 n_data: int | None = None, eps: float = 1e-7) -> Tensor:
    """Per-row losses [B] in the accumulation dtype: RepDistiller's row loss
    -log(P0 / (P0 + c + eps)) - sum_k log(c / (Pk + c + eps)), P = exp(s/T - log Z), c = K / n_data,
    in log space: with l = s/T - log Z - log(c + eps) it is exactly
        softplus(-l_0) + sum_k [softplus(l_k) + log1p(eps / c)],
    which no logit, however large, overflows (exp then log returns inf past s/T ~ 709 in float64)."""
    n_data = memory.shape[0] if n_data is None else n_data
    k = idx.shape[1] - 1
    c = k / n_data
    s = crd_scores(anchor, memory.detach(), idx)
    l = s / temperature - log_z_like(log_z, s) - math.log(c + eps)
    return softplus(-l[:, 0]) + softplus(l[:, 1:]).sum(1) + k * math.log1p(eps / c)


def crd_nce_loss(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07,
                 log_z, n_data: int | None = None, eps: float = 1e-7,
                 reduction: str = "mean") -> Tensor:
    rows = crd_nce_rows(anchor, memory, idx, temperature=temperature, log_z=log_z, n_data=n_data, eps=eps)
    return reduce_rows(rows, reduction, anchor.dtype)


def crd_log_z(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07,
              n_data: int | None = None) -> Tensor:
    """log(n_data * mean(exp(s / T))) over all B(K+1) scores: the Z that CRD freezes on its first batch."""
    n_data = memory.shape[0] if n_data is None else n_data
    s = crd_scores(anchor.detach(), memory.detach(), idx) / temperature
    return torch.logsumexp(s.flatten(), 0) - math.log(s.numel()) + math.log(n_data)


# ----------------------------------------------------------------------------------------------------
# 2. infonce_bank_loss: InfoNCE of each query against its positive and a shared bank (MoCo queue).
# ----------------------------------------------------------------------------------------------------
def infonce_bank_rows(query: Tensor, positive: Tensor, bank: Tensor, *, temperature: float = 0.07,
                      return_rank: bool = False):
    """Per-row losses [B] in the accumulation dtype: logsumexp([<q,p>, <q,bank_k>...] / T) - <q,p> / T.

    return_rank: also rank [B] int64, the bank rows whose logit is strictly above the positive's (a tie
    counts for the positive), so that MoCo's acc@k is (rank < k).
    """
    dt = compute_dtype(query)
    q, p, k = query.to(dt), positive.to(dt), bank.detach().to(dt)
    logits = torch.cat([(q * p).sum(1, keepdim=True), q @ k.t()], 1) / temperature
    rows = torch.logsumexp(logits, 1) - logits[:, 0]
    if not return_rank:
        return rows
    return rows, (logits[:, 1:] > logits[:, :1]).sum(1)


def infonce_bank_loss(query: Tensor, positive: Tensor, bank: Tensor, *, temperature: float = 0.07,
                      reduction: str = "mean") -> Tensor:
    return reduce_rows(infonce_bank_rows(query, positive, bank, temperature=temperature), reduction, query.dtype)


def infonce_bank_pairs_rows(query: Tensor, positive: Tensor | None, bank: Tensor, *, temperature: float = 0.07,
                            batch_negatives: Tensor | None = None, labels: Tensor | None = None,
                            bank_labels: Tensor | None = None, normalize: bool = False) -> tuple[Tensor, Tensor]:
    """infonce_bank_loss with in-batch keys, labels and cosine scores (CrossBatchMemory(NTXentLoss)).

    Candidates of query b: every bank row and every batch_negatives row j != b. Without labels they are
    all negatives and positive[b] is the one positive. With labels a candidate whose label equals
    labels[b] is a positive, any other a negative; positive[b] (optional then) is one more positive.
    Each (query, positive) pair costs softplus(logsumexp(negatives of b) - s_pos); 'none' gives the
    per-query sums, 'sum' their total, 'mean' the total over the number of pairs (0 without pairs).
    Returns (per-query sums [B] in the accumulation dtype, the number of pairs).
    """
    dt = compute_dtype(query)

    def prep(x: Tensor) -> Tensor:
        return F.normalize(x.to(dt), dim=1) if normalize else x.to(dt)

    q = prep(query)
    b = q.shape[0]
    none = torch.zeros(b, 0, dtype=torch.bool, device=q.device)
    scores, negative, positives = [q.new_zeros(b, 0)], [none], [none]
    if positive is not None:
        scores.append((q * prep(positive)).sum(1, keepdim=True))
        negative.append(torch.zeros(b, 1, dtype=torch.bool, device=q.device))
        positives.append(~negative[-1])
    if bank.shape[0]:
        scores.append(q @ prep(bank.detach()).t())
        same = (labels[:, None] == bank_labels[None] if labels is not None
                else torch.zeros(b, bank.shape[0], dtype=torch.bool, device=q.device))
        negative.append(~same)
        positives.append(same)
    if batch_negatives is not None:
        scores.append(q @ prep(batch_negatives).t())
        other = ~torch.eye(b, dtype=torch.bool, device=q.device)
        same = labels[:, None] == labels[None] if labels is not None else torch.zeros_like(other)
        negative.append(other & ~same)
        positives.append(other & same)
    s = torch.cat(scores, 1) / temperature
    negative, positives = torch.cat(negative, 1), torch.cat(positives, 1)
    has_negative = negative.any(1, keepdim=True)
    # a row without negatives gets logsumexp = -inf; its finite stand-in keeps the gradient NaN-free
    lse = torch.logsumexp(s.masked_fill(~negative, -math.inf).masked_fill(~has_negative, 0.0), 1, keepdim=True)
    lse = lse.masked_fill(~has_negative, -math.inf)
    # log(exp(lse) + exp(s)) - s: softplus(lse - s) without F.softplus's linear cut-off above 20
    return torch.where(positives, torch.logaddexp(lse, s) - s, 0.0).sum(1), positives.sum()


def infonce_bank_pairs_loss(query: Tensor, positive: Tensor | None, bank: Tensor, *, temperature: float = 0.07,
                            batch_negatives: Tensor | None = None, labels: Tensor | None = None,
                            bank_labels: Tensor | None = None, normalize: bool = False,
                            reduction: str = "mean") -> Tensor:
    rows, pairs = infonce_bank_pairs_rows(query, positive, bank, temperature=temperature,
                                          batch_negatives=batch_negatives, labels=labels, bank_labels=bank_labels,
                                          normalize=normalize)
    return reduce_pairs(rows, pairs, reduction, query.dtype)


# ----------------------------------------------------------------------------------------------------
# 3. relational_contrastive_loss: CRRCD, both sides, rows (i, j) with i != j, frozen Z per side.
# ----------------------------------------------------------------------------------------------------
def relation_t(p: RelationalParams, a: Tensor, b: Tensor) -> Tensor:
    return F.linear(F.relu(F.linear(a, p.ft_w1) - F.linear(b, p.ft_w1) + p.ft_b1), p.ft_w2, p.ft_b2)


def relation_ts(p: RelationalParams, a: Tensor, b: Tensor) -> Tensor:
    return F.linear(F.relu(F.linear(a, p.fts_u) - F.linear(b, p.fts_v) + p.fts_b1), p.fts_w2, p.fts_b2)


def critic_h1(p: RelationalParams, x: Tensor) -> Tensor:
    return F.normalize(F.linear(x, p.h1_w, p.h1_b), dim=-1)


def critic_h2(p: RelationalParams, x: Tensor) -> Tensor:
    return F.normalize(F.linear(x, p.h2_w, p.h2_b), dim=-1)


def relational_scores(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor, neg_idx: Tensor,
                      params: RelationalParams, key_params: RelationalParams | None = None,
                      key_e_s: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scores [R, K+1] of (student side, teacher side): column 0 the positive, 1..K partner j's negatives.

    Keys are stop-grad: they are built from key_params / key_e_s, by default detached copies of params / e_s.
    """
    dt = compute_dtype(e_s)
    p = RelationalParams(*(as_dtype(t, dt) for t in params))
    frozen = RelationalParams(*(as_dtype(t.detach(), dt) for t in (key_params or params)))
    e_t, e_s = as_dtype(e_t.detach(), dt), as_dtype(e_s, dt)
    key_e_s = as_dtype((e_s if key_e_s is None else key_e_s).detach(), dt)
    queue_t, queue_s = as_dtype(queue_t.detach(), dt), as_dtype(queue_s.detach(), dt)
    i, j = pair_indices(e_t.shape[0], e_t.device)
    neg = neg_idx.long()[j]                                   # [R, K]
    a = e_t[i]
    # student side: query from the cross-resolution relation, keys from the teacher-space relation
    b = e_s.shape[0]
    q_s = critic_h2(p, relation_ts(p, a, off_diagonal(e_s.expand(b, *e_s.shape))))  # e_s[j], deterministic grad
    k_s = torch.cat([critic_h1(frozen, relation_t(frozen, a, e_t[j]))[:, None],
                     critic_h1(frozen, relation_t(frozen, a[:, None], queue_t[neg]))], 1)
    # teacher side: query from the teacher-space relation, keys from the cross-resolution relation
    q_t = critic_h1(p, relation_t(p, a, e_t[j]))
    k_t = torch.cat([critic_h2(frozen, relation_ts(frozen, a, key_e_s[j]))[:, None],
                     critic_h2(frozen, relation_ts(frozen, a[:, None], queue_s[neg]))], 1)
    return torch.einsum("rd,rkd->rk", q_s, k_s), torch.einsum("rd,rkd->rk", q_t, k_t)


def relational_side_rows(scores: Tensor, temperature: float, log_z, num_negatives: int, n_data: int,
                         eps: float = 1e-7) -> Tensor:
    """Per-row NCE critic of one side: softplus(-l_0) + sum_k softplus(l_k), l = s/tau - log Z - log(K/N + eps)."""
    l = scores / temperature - log_z_like(log_z, scores) - math.log(num_negatives / n_data + eps)
    return softplus(-l[:, 0]) + softplus(l[:, 1:]).sum(1)


def relational_rows(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor, neg_idx: Tensor,
                    params: RelationalParams, *, temperature: float = 0.1, log_z_t, log_z_s, n_data: int,
                    eps: float = 1e-7) -> Tensor:
    """Per-row losses [R] in the accumulation dtype: student side + teacher side of each pair (i, j)."""
    s_student, s_teacher = relational_scores(e_t, e_s, queue_t, queue_s, neg_idx, params)
    k = neg_idx.shape[1]
    return (relational_side_rows(s_student, temperature, log_z_s, k, n_data, eps)
            + relational_side_rows(s_teacher, temperature, log_z_t, k, n_data, eps))


def relational_contrastive_loss(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor,
                                neg_idx: Tensor, params: RelationalParams, *, temperature: float = 0.1,
                                log_z_t, log_z_s, n_data: int, eps: float = 1e-7,
                                reduction: str = "mean") -> Tensor:
    rows = relational_rows(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature=temperature, log_z_t=log_z_t,
                           log_z_s=log_z_s, n_data=n_data, eps=eps)
    return reduce_rows(rows, reduction, e_s.dtype)


def relational_log_z(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor, neg_idx: Tensor,
                     params: RelationalParams, *, temperature: float = 0.1,
                     n_data: int) -> tuple[Tensor, Tensor]:
    """(log_z_t, log_z_s): log(n_data * mean(exp(s / tau))) over all R(K+1) scores of each side."""
    with torch.no_grad():
        s_student, s_teacher = relational_scores(e_t, e_s, queue_t, queue_s, neg_idx, params)

    def estimate(s):
        return torch.logsumexp(s.flatten() / temperature, 0) - math.log(s.numel()) + math.log(n_data)

    return estimate(s_teacher), estimate(s_student)


# ----------------------------------------------------------------------------------------------------
# 4. feature_regression_loss: 1x1-conv adapter + MSE against a teacher feature map (GDRD stage 1).
# ----------------------------------------------------------------------------------------------------
def feature_regression_rows(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Per-sample mean squared error [B] over Ct*H*W, in the accumulation dtype."""
    dt = compute_dtype(student)
    x, w = student.to(dt), weight.to(dt)
    proj = torch.einsum("oc,bc...->bo...", w, x)
    if bias is not None:
        proj = proj + bias.to(dt).view(1, -1, *([1] * (x.dim() - 2)))
    return (proj - teacher.detach().to(dt)).pow(2).flatten(1).mean(1)


def feature_regression_loss(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None = None,
                            *, reduction: str = "mean") -> Tensor:
    """'mean' = mean over all B*Ct*H*W elements; 'sum' their sum; 'none' = per-sample mean over Ct*H*W, [B]."""
    rows = feature_regression_rows(student, teacher, weight, bias)
    return reduce_rows(rows, reduction, student.dtype, row_size=teacher[0].numel())


# ----------------------------------------------------------------------------------------------------
# 5. Memory bank update and queue.
# ----------------------------------------------------------------------------------------------------
def last_occurrence_mask(idx: Tensor, n: int) -> Tensor:
    """True at the last position of each distinct value of idx (what 'last duplicate wins' keeps)."""
    pos = torch.arange(idx.numel(), device=idx.device)
    last = torch.full((n,), -1, dtype=pos.dtype, device=idx.device)
    last.scatter_reduce_(0, idx.long(), pos, reduce="amax")
    return last[idx.long()] == pos


def bank_update_(memory: Tensor, idx: Tensor, values: Tensor, momentum: float) -> Tensor:
    """memory[idx] = normalize(m * memory[idx] + (1 - m) * values), from the rows before the call."""
    idx = idx.long()
    keep = last_occurrence_mask(idx, memory.shape[0])
    dt = compute_dtype(values)
    mixed = memory[idx].to(dt) * momentum + values.detach().to(dt) * (1 - momentum)
    memory[idx[keep]] = F.normalize(mixed, dim=1)[keep].to(memory.dtype)
    return memory


def queue_push_(queue: Tensor, ptr: Tensor, count: Tensor, values: Tensor,
                labels: Tensor | None = None, queue_labels: Tensor | None = None) -> None:
    """FIFO ring buffer: write values at ptr, ptr + 1, ... (mod size); keeps the newest `size` rows."""
    size, n = queue.shape[0], values.shape[0]
    pos = (ptr + torch.arange(n, device=queue.device)) % size
    keep = last_occurrence_mask(pos, size)
    queue[pos[keep]] = values.detach()[keep].to(queue.dtype)
    if queue_labels is not None:
        queue_labels[pos[keep]] = labels[keep].to(queue_labels.dtype)
    ptr.copy_((ptr + n) % size)
    count.copy_(torch.clamp(count + n, max=size))


# Counter-based draws shared by every backend (csrc/sampling.h): draw (row, col) of a seed is a pure
# function of (seed, row, col), so the CPU and CUDA kernels and this reference agree index for index.
_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, m: int) -> Tensor:
    """(x * m) mod 2**32 for x in [0, 2**32), exact in int64: m is split so that no product overflows."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (the "lowbias32" xorshift-multiply finaliser)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: Tensor, rows: int, cols: int) -> Tensor:
    """[rows, cols] float64 uniforms in [0, 1) with 53 random bits, from a one-element int64 seed."""
    s = seed.reshape(()).long()
    h = _mix32(_mix32((s & _MASK32) ^ 0x9E3779B9) ^ ((s >> 32) & _MASK32))
    r = torch.arange(rows, device=seed.device)
    h = _mix32(_mix32(h ^ (r & _MASK32)) ^ (r >> 32))
    h = _mix32(h[:, None] ^ torch.arange(cols, device=seed.device))
    hi, lo = _mix32(h ^ 0x85EBCA6B) >> 11, _mix32(h ^ 0xC2B2AE35)
    return (hi.double() * 2.0 ** 32 + lo.double()) * 2.0 ** -53


def queue_sample_negatives(queue_labels: Tensor | None, filled: int, partner_labels: Tensor, seed: Tensor,
                           k: int) -> Tensor:
    """[B, k] int64 indices into the first `filled` queue rows, uniform with replacement: over all of them
    without labels, else over those whose label differs from partner_labels[b]. A row with none is all -1.

    Draw u in [0, 1) picks rank floor(u * valid) among the valid rows in stably sorted label order.
    """
    u = counter_uniform(seed, partner_labels.shape[0], k)
    if queue_labels is None:
        return torch.clamp((u * filled).long(), max=filled - 1)
    sorted_labels, order = torch.sort(queue_labels[:filled].long(), stable=True)
    partner = partner_labels.long()
    lo = torch.searchsorted(sorted_labels, partner, right=False)
    same = torch.searchsorted(sorted_labels, partner, right=True) - lo
    valid = filled - same
    rank = torch.minimum((u * valid[:, None]).long(), (valid - 1)[:, None])
    pos = torch.where(rank < lo[:, None], rank, rank + same[:, None])
    return torch.where(valid[:, None] > 0, order[pos.clamp(0, filled - 1)], -1)
