"""The public functional losses: plain tensors in, a loss out (ops.md).

Each function validates its arguments, picks a backend ('auto' = fastest available for the tensors'
device, 'torch' = gdrd_fast.reference) and reduces the per-row losses. Float64 inputs stay float64;
other dtypes accumulate in float32 and return float32 scalars ('none' returns the input dtype).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends, reference
from . import validation as check
from .ops import crd_nce, feature_regression, infonce, infonce_pairs, relational
from .reference import RelationalParams

__all__ = ["crd_nce_loss", "crd_log_z", "infonce_bank_loss", "relational_contrastive_loss",
           "relational_log_z", "feature_regression_loss"]


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_crd(anchor, memory, idx, temperature, n_data):
    check.tensor("anchor", anchor, 2)
    check.tensor("memory", memory, 2)
    check.tensor("idx", idx, 2, check.INDEX_DTYPES)
    device = check.same_device(anchor=anchor, memory=memory, idx=idx)
    check.same_size("batch size", **{"anchor.shape[0]": anchor.shape[0], "idx.shape[0]": idx.shape[0]})
    check.same_size("feature dim", **{"anchor.shape[1]": anchor.shape[1], "memory.shape[1]": memory.shape[1]})
    if idx.shape[1] < 2:
        raise ValueError(f"idx must hold a positive and at least one negative per row, got shape {tuple(idx.shape)}")
    check.positive("temperature", temperature)
    n_data = memory.shape[0] if n_data is None else n_data
    if not isinstance(n_data, int) or n_data <= 0:
        raise ValueError(f"n_data must be a positive int, got {n_data!r}")
    check.index_in_range("idx", idx, memory.shape[0])
    check.finite("anchor", anchor)
    return device, n_data


def crd_nce_loss(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07, log_z,
                 n_data: int | None = None, eps: float = 1e-7, reduction: str = "mean",
                 backend: str = "auto") -> Tensor:
    """CRD's NCE loss of anchors against their gathered memory-bank rows (RepDistiller-exact).

    anchor [B, D] (grad), memory [N, D] (no grad), idx [B, K+1] (column 0 = positive), log_z = the
    frozen normaliser (see crd_log_z).
    """
    check.reduction(reduction)
    device, n_data = _check_crd(anchor, memory, idx, temperature, n_data)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    log_z = check.log_z_value("log_z", log_z, anchor)
    name = backends.resolve("crd_nce_loss", crd_nce.IMPLS, backend, device)
    if name == "torch":
        return reference.crd_nce_loss(anchor, memory, idx, temperature=temperature, log_z=log_z,
                                      n_data=n_data, eps=eps, reduction=reduction)
    c = (idx.shape[1] - 1) / n_data
    rows, _ = crd_nce.crd_nce_op(anchor, memory.detach(), idx, log_z.to(torch.float64), temperature, c,
                                 eps, name, _needs_grad(anchor))
    return reference.reduce_rows(rows, reduction, anchor.dtype)


def crd_log_z(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07,
              n_data: int | None = None) -> Tensor:
    """log(n_data * mean(exp(s / T))) over the batch's B(K+1) scores: CRD's first-batch normaliser."""
    _, n_data = _check_crd(anchor, memory, idx, temperature, n_data)
    with torch.no_grad():
        dt = reference.compute_dtype(anchor)
        # chunks of rows keep the gather small; the estimate is a log-sum-exp over all scores
        chunk = max(1, 2 ** 22 // (idx.shape[1] * anchor.shape[1]))
        lse = torch.stack([
            torch.logsumexp(reference.crd_scores(anchor[i:i + chunk], memory, idx[i:i + chunk]).flatten()
                            / temperature, 0)
            for i in range(0, anchor.shape[0], chunk)]).to(dt)
        return torch.logsumexp(lse, 0) - math.log(idx.numel()) + math.log(n_data)


def infonce_bank_loss(query: Tensor, positive: Tensor | None, bank: Tensor, *, temperature: float = 0.07,
                      reduction: str = "mean", backend: str = "auto", batch_negatives: Tensor | None = None,
                      normalize: bool = False, labels: Tensor | None = None,
                      bank_labels: Tensor | None = None) -> Tensor:
    """InfoNCE of each query against its positive and a shared negative bank (MoCo queue).

    loss[b] = logsumexp([<q_b,p_b>, <q_b,bank_k>...] / T) - <q_b,p_b> / T. The bank may be empty.
    Options (pytorch-metric-learning's CrossBatchMemory(NTXentLoss) is all of them together):
    - batch_negatives [B, D]: in-batch keys; row j != b is one more negative of query b (row b is the
      query's own positive or the query itself, so it is skipped). Carries gradient if it has one.
    - normalize: cosine scores (query, positive, bank and batch_negatives L2-normalised first).
    - labels [B] with bank_labels [K]: a bank or in-batch row of the query's class is a positive, not a
      negative; each (query, positive) pair is then a row (positive[b], optional now, is one more), and
      'mean' divides by the number of pairs ('none' gives per-query sums). See
      gdrd_fast.reference.infonce_bank_pairs_loss for the formula.
    Without labels the bank still takes the fused single pass; labels mask it in a chunked torch path.
    """
    check.reduction(reduction)
    check.tensor("query", query, 2)
    if positive is None and labels is None:
        raise ValueError("positive is required unless labels are given (then same-label rows are the positives)")
    if positive is not None:
        check.tensor("positive", positive, 2)
    if not isinstance(bank, Tensor) or bank.dim() != 2 or bank.dtype not in check.FLOAT_DTYPES:
        check.tensor("bank", bank, 2)  # raises the usual message; an empty bank (0 rows) is allowed
    extended = batch_negatives is not None or normalize or labels is not None or bank.shape[0] == 0
    if batch_negatives is not None:
        check.tensor("batch_negatives", batch_negatives, 2)
    if labels is not None:
        check.tensor("labels", labels, 1, check.INDEX_DTYPES)
        check.same_size("batch size", **{"query.shape[0]": query.shape[0], "labels.shape[0]": labels.shape[0]})
        if bank.shape[0]:
            if bank_labels is None:
                raise ValueError("bank_labels is required with labels and a non-empty bank")
            check.tensor("bank_labels", bank_labels, 1, check.INDEX_DTYPES)
            check.same_size("bank rows", **{"bank.shape[0]": bank.shape[0], "bank_labels.shape[0]": bank_labels.shape[0]})
    elif bank_labels is not None:
        raise ValueError("bank_labels needs labels (the query labels) too")
    device = check.same_device(query=query, positive=positive, bank=bank, batch_negatives=batch_negatives,
                               labels=labels, bank_labels=bank_labels if bank.shape[0] else None)
    for name, t in (("positive", positive), ("batch_negatives", batch_negatives)):
        if t is not None and t.shape != query.shape:
            raise ValueError(f"{name} must match query's shape {tuple(query.shape)}, got {tuple(t.shape)}")
    check.same_size("feature dim", **{"query.shape[1]": query.shape[1], "bank.shape[1]": bank.shape[1]})
    check.positive("temperature", temperature)
    check.finite("query", query)
    if positive is not None:
        check.finite("positive", positive)
    if batch_negatives is not None:
        check.finite("batch_negatives", batch_negatives)
    name = backends.resolve("infonce_bank_loss", infonce.IMPLS, backend, device)
    if extended:
        if name == "torch":
            return reference.infonce_bank_pairs_loss(
                query, positive, bank, temperature=temperature, batch_negatives=batch_negatives, labels=labels,
                bank_labels=bank_labels, normalize=normalize, reduction=reduction)
        rows, pairs = infonce_pairs.pair_rows(query, positive, bank, batch_negatives, labels, bank_labels,
                                              temperature, normalize, name,
                                              _needs_grad(query, positive, batch_negatives))
        if reduction == "mean":
            return rows.sum() / (pairs.clamp_min(1) if isinstance(pairs, Tensor) else pairs)
        return reference.reduce_rows(rows, reduction, query.dtype)
    if name == "torch":
        return reference.infonce_bank_loss(query, positive, bank, temperature=temperature, reduction=reduction)
    rows, _, _ = infonce.infonce_bank_op(query, positive, bank.detach(), temperature, name,
                                         _needs_grad(query, positive))
    return reference.reduce_rows(rows, reduction, query.dtype)


def _check_relational(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data):
    check.tensor("e_t", e_t, 2)
    check.tensor("e_s", e_s, 2)
    check.tensor("queue_t", queue_t, 2)
    check.tensor("queue_s", queue_s, 2)
    check.tensor("neg_idx", neg_idx, 2, check.INDEX_DTYPES)
    if not isinstance(params, RelationalParams):
        raise TypeError(f"params must be a gdrd_fast.RelationalParams, got {type(params).__name__}")
    for field, value in params._asdict().items():
        check.tensor(f"params.{field}", value, (1, 2))
    device = check.same_device(e_t=e_t, e_s=e_s, queue_t=queue_t, queue_s=queue_s, neg_idx=neg_idx,
                               **{f"params.{k}": v for k, v in params._asdict().items()})
    if e_t.shape != e_s.shape:
        raise ValueError(f"e_t and e_s must have the same shape, got {tuple(e_t.shape)} and {tuple(e_s.shape)}")
    if e_t.shape[0] < 2:
        raise ValueError(f"the batch needs at least 2 samples to form pairs (i != j), got {e_t.shape[0]}")
    if queue_t.shape != queue_s.shape:
        raise ValueError(f"queue_t and queue_s must have the same shape, got {tuple(queue_t.shape)} "
                         f"and {tuple(queue_s.shape)}")
    check.same_size("embedding dim", **{"e_t.shape[1]": e_t.shape[1], "queue_t.shape[1]": queue_t.shape[1],
                                        "params.ft_w1.shape[1]": params.ft_w1.shape[1]})
    check.same_size("batch size", **{"e_t.shape[0]": e_t.shape[0], "neg_idx.shape[0]": neg_idx.shape[0]})
    check.positive("temperature", temperature)
    if not isinstance(n_data, int) or n_data <= 0:
        raise ValueError(f"n_data must be a positive int, got {n_data!r}")
    check.index_in_range("neg_idx", neg_idx, queue_t.shape[0])
    check.finite("e_t", e_t)
    check.finite("e_s", e_s)
    return device


def relational_contrastive_loss(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor,
                                neg_idx: Tensor, params: RelationalParams, *, temperature: float = 0.1,
                                log_z_t, log_z_s, n_data: int, reduction: str = "mean",
                                backend: str = "auto") -> Tensor:
    """CRRCD's relational contrastive loss, student side + teacher side (method.md section 3).

    Rows are all pairs (i, j), i != j; neg_idx[j] holds partner j's K queue negatives. 'none' gives the
    per-row [B(B-1)] sum of both sides.
    """
    check.reduction(reduction)
    device = _check_relational(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data)
    log_z_t = check.log_z_value("log_z_t", log_z_t, e_s)
    log_z_s = check.log_z_value("log_z_s", log_z_s, e_s)
    name = backends.resolve("relational_contrastive_loss", relational.IMPLS, backend, device)
    if name == "torch":
        return reference.relational_contrastive_loss(
            e_t, e_s, queue_t, queue_s, neg_idx, params, temperature=temperature, log_z_t=log_z_t,
            log_z_s=log_z_s, n_data=n_data, reduction=reduction)
    rows_student, rows_teacher = relational.relational_rows(
        e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, log_z_t, log_z_s, n_data, name)
    if reduction == "none":
        return (rows_student + rows_teacher).to(e_s.dtype)
    return (reference.reduce_rows(rows_student, reduction, e_s.dtype)
            + reference.reduce_rows(rows_teacher, reduction, e_s.dtype))


def relational_log_z(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor, neg_idx: Tensor,
                     params: RelationalParams, *, temperature: float = 0.1, n_data: int,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(log_z_t, log_z_s): each side's log(n_data * mean(exp(s / tau))) over its R(K+1) scores."""
    device = _check_relational(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data)
    name = backends.resolve("relational_log_z", relational.IMPLS, backend, device)
    if name == "torch":
        return reference.relational_log_z(e_t, e_s, queue_t, queue_s, neg_idx, params,
                                          temperature=temperature, n_data=n_data)
    return relational.relational_log_z(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data, name)


def feature_regression_loss(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None = None,
                            *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """mean((conv1x1(student, weight, bias) - teacher)^2): GDRD's stage-1 loss with its adapter.

    student [B, Cs, H, W] or [B, Cs], teacher [B, Ct, ...] (no grad), weight [Ct, Cs] (or [Ct, Cs, 1, 1]).
    'none' gives the per-sample mean [B].
    """
    check.reduction(reduction)
    check.tensor("student", student, (2, 4))
    check.tensor("teacher", teacher, (2, 4))
    if weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    check.tensor("weight", weight, 2)
    if bias is not None:
        check.tensor("bias", bias, 1)
    device = check.same_device(student=student, teacher=teacher, weight=weight, bias=bias)
    expected = (student.shape[0], weight.shape[0], *student.shape[2:])
    if tuple(teacher.shape) != expected:
        raise ValueError(f"teacher must have shape {expected} (B, Ct=weight.shape[0], spatial of student), "
                         f"got {tuple(teacher.shape)}")
    check.same_size("input channels", **{"student.shape[1]": student.shape[1], "weight.shape[1]": weight.shape[1]})
    if bias is not None:
        check.same_size("output channels", **{"weight.shape[0]": weight.shape[0], "bias.shape[0]": bias.shape[0]})
    check.finite("student", student)
    check.finite("teacher", teacher)
    name = backends.resolve("feature_regression_loss", feature_regression.IMPLS, backend, device)
    if name == "torch":
        return reference.feature_regression_loss(student, teacher, weight, bias, reduction=reduction)
    rows = feature_regression.feature_regression_rows(student, teacher, weight, bias, name)
    if reduction == "none":
        return rows.to(student.dtype)
    return rows.mean() if reduction == "mean" else rows.sum() * math.prod(teacher.shape[1:])
