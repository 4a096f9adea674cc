"""The public functional losses: plain tensors in, a loss out (docs/ops/index.md).

Each function validates its arguments, picks a backend ('auto' = fastest available for the tensors'
device, 'torch' = gdrd_fast.reference) and reduces the per-row losses. Float64 inputs stay float64;
other dtypes accumulate in float32 and return float32 scalars ('none' returns the input dtype).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backends
from . import validation as check
from .ops import crd_nce, feature_regression, infonce, infonce_pairs, relational
from .ops import memory as memory_ops
from .numerics import reduce_pairs, reduce_rows
from .params import RelationalParams, relational_param_shapes

__all__ = ["crd_nce_loss", "crd_nce_pair_loss", "crd_log_z", "bank_update_", "bank_update_pair_", "queue_push_",
           "queue_sample_negatives", "infonce_bank_loss", "relational_contrastive_loss",
           "relational_log_z", "feature_regression_loss"]


def check_backend(op: str, backend: str, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> str:
    """`backend` is a name `op` knows (what a Module checks in __init__); with device and dtype also that it
    runs there (what a Module checks before it draws or writes), else the error that says what is missing.
    op: the name of a functional entry below (crd_nce_pair_loss, queue_push_, ...)."""
    table = backends.op(op)
    table.check_name(backend)
    if device is not None:
        table.resolve(backend, device, dtype)
    return backend


def has_backend(op: str, backend: str) -> bool:
    return backend in backends.op(op)


CRD_NAMES = dict(anchor="anchor", memory="memory", idx="idx", log_z="log_z")


def check_crd(anchor, memory, idx, temperature, n_data, eps=0.0, *, names=CRD_NAMES) -> tuple[torch.device, int]:
    """Every check of crd_nce_loss / crd_log_z; `names` are the caller's own names for the tensors."""
    device = check.structure_checked(_CRD_STRUCTURES, lambda: _check_crd_structure(anchor, memory, idx, names),
                                     anchor, memory, idx)
    check.positive("temperature", temperature)
    check.non_negative("eps", eps)
    n_data = memory.shape[0] if n_data is None else check.positive_int("n_data", n_data)
    check.index_in_range(names["idx"], idx, memory.shape[0])
    check.finite(names["anchor"], anchor)
    check.finite(names["memory"], memory)
    return device, n_data


_CRD_STRUCTURES: dict = {}


def _check_crd_structure(anchor, memory, idx, names) -> torch.device:
    a, m, i = names["anchor"], names["memory"], names["idx"]
    check.tensor(a, anchor, 2)
    check.tensor(m, memory, 2)
    check.tensor(i, idx, 2, check.INDEX_DTYPES)
    device = anchor.device
    if memory.device != device or idx.device != device:
        check.same_device(**{a: anchor, m: memory, i: idx})  # raises, naming each device
    if anchor.shape[0] != idx.shape[0]:
        check.same_size("batch size", **{f"{a}.shape[0]": anchor.shape[0], f"{i}.shape[0]": idx.shape[0]})
    if anchor.shape[1] != memory.shape[1]:
        check.same_size("feature dim", **{f"{a}.shape[1]": anchor.shape[1], f"{m}.shape[1]": memory.shape[1]})
    if idx.shape[1] < 2:
        raise ValueError(f"{i} must be [B, K+1]: a positive and at least one negative per row, "
                         f"got shape {tuple(idx.shape)}")
    check.no_grad_input(m, memory, "a memory bank is updated, not trained")
    return device


def crd_nce_loss(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07, log_z,
                 n_data: int | None = None, eps: float = 1e-7, reduction: str = "mean",
                 backend: str = "auto") -> Tensor:
    """CRD's NCE loss of anchors against their gathered memory-bank rows (RepDistiller-exact).

    anchor [B, D] (grad), memory [N, D] (no grad), idx [B, K+1] (column 0 = positive), log_z = the
    frozen normaliser (see crd_log_z; a float or a one-element tensor, never given a gradient).
    """
    check.reduction(reduction)
    device, n_data = check_crd(anchor, memory, idx, temperature, n_data, eps)
    log_z = check.log_z_value("log_z", log_z, anchor)
    name = crd_nce.IMPLS.resolve(backend, device, anchor.dtype, d=anchor.shape[1])
    rows = crd_nce.IMPLS[name].load()(anchor, memory, idx, temperature=temperature, log_z=log_z, n_data=n_data,
                                      eps=eps)
    return reduce_rows(rows, reduction, anchor.dtype)


def crd_nce_pair_loss(anchor_a: Tensor, memory_a: Tensor, log_z_a, anchor_b: Tensor, memory_b: Tensor, log_z_b,
                      idx: Tensor, *, temperature: float = 0.07, n_data: int | None = None, eps: float = 1e-7,
                      reduction: str = "mean", backend: str = "auto", names_a=CRD_NAMES, names_b=CRD_NAMES) -> Tensor:
    """crd_nce_loss(anchor_a, memory_a, idx, log_z_a) + crd_nce_loss(anchor_b, memory_b, idx, log_z_b): both
    sides of CRDLoss from one read of idx (the fused pair kernel). `names_a` / `names_b` name the tensors
    in errors as the caller knows them."""
    check.reduction(reduction)
    device, n_data = check_crd(anchor_a, memory_a, idx, temperature, n_data, eps, names=names_a)
    check_crd(anchor_b, memory_b, idx, temperature, n_data, eps, names=names_b)
    if anchor_b.shape != anchor_a.shape or memory_b.shape != memory_a.shape:
        raise ValueError(f"both sides need the same shapes: {names_a['anchor']} {tuple(anchor_a.shape)} and "
                         f"{names_b['anchor']} {tuple(anchor_b.shape)}, {names_a['memory']} "
                         f"{tuple(memory_a.shape)} and {names_b['memory']} {tuple(memory_b.shape)}")
    log_z_a = check.log_z_value(names_a["log_z"], log_z_a, anchor_a)
    log_z_b = check.log_z_value(names_b["log_z"], log_z_b, anchor_b)
    return run_crd_nce_pair_loss(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, temperature=temperature,
                                 n_data=n_data, eps=eps, reduction=reduction, backend=backend, device=device)


def run_crd_nce_pair_loss(anchor_a: Tensor, memory_a: Tensor, log_z_a: Tensor, anchor_b: Tensor, memory_b: Tensor,
                          log_z_b: Tensor, idx: Tensor, *, temperature: float, n_data: int, eps: float,
                          reduction: str, backend: str, device: torch.device) -> Tensor:
    """crd_nce_pair_loss after its checks (log Z as 0-dim float64 tensors on `device`), for a caller that made
    them itself (CRDLoss): checks run once, at the outermost layer."""
    name = crd_nce.PAIR_IMPLS.resolve(backend, device, backends.dispatch_dtype(anchor_a, anchor_b),
                                      d=anchor_a.shape[1])
    rows_a, rows_b = crd_nce.PAIR_IMPLS[name].load()(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx,
                                                     temperature=temperature, n_data=n_data, eps=eps)
    return reduce_rows(rows_a, reduction, anchor_a.dtype) + reduce_rows(rows_b, reduction, anchor_b.dtype)


def crd_log_z(anchor: Tensor, memory: Tensor, idx: Tensor, *, temperature: float = 0.07,
              n_data: int | None = None, names=CRD_NAMES, backend: str = "auto") -> Tensor:
    """log(n_data * mean(exp(s / T))) over the batch's B(K+1) scores: CRD's first-batch normaliser."""
    device, n_data = check_crd(anchor, memory, idx, temperature, n_data, names=names)
    name = crd_nce.LOG_Z_IMPLS.resolve(backend, device, anchor.dtype)
    return crd_nce.LOG_Z_IMPLS[name].load()(anchor, memory, idx, temperature=temperature, n_data=n_data)


_INFONCE_NAMES = ("query", "positive", "batch_negatives", "bank")


def infonce_bank_loss(query: Tensor, positive: Tensor | None, bank: Tensor, *, temperature: float = 0.07,
                      reduction: str = "mean", backend: str = "auto", batch_negatives: Tensor | None = None,
                      normalize: bool = False, labels: Tensor | None = None,
                      bank_labels: Tensor | None = None, return_rank: bool = False):
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
    return_rank (plain bank only): (loss, rank [B] int64), rank[b] = bank rows whose logit is strictly
    above the positive's, counted in the same pass; MoCo's acc@k is (rank < k).float().mean().
    """
    check.reduction(reduction)
    device = check.structure_checked(
        _INFONCE_STRUCTURES,
        lambda: _check_infonce_structure(query, positive, bank, batch_negatives, labels, bank_labels),
        query, positive, bank, batch_negatives, labels, bank_labels)
    extended = batch_negatives is not None or normalize or labels is not None or bank.shape[0] == 0
    check.positive("temperature", temperature)
    check.finite_each(_INFONCE_NAMES, (query, positive, batch_negatives, bank))
    dtype = backends.dispatch_dtype(query, bank)
    if return_rank and (batch_negatives is not None or normalize or labels is not None):
        raise ValueError("return_rank needs a plain bank: no batch_negatives, normalize or labels")
    if return_rank and bank.shape[0] == 0:  # nothing can score above the positive
        return (infonce_bank_loss(query, positive, bank, temperature=temperature, reduction=reduction,
                                  backend=backend), torch.zeros(query.shape[0], dtype=torch.long, device=device))
    if extended:  # in-batch keys, labels or cosine scores: each (query, positive) pair is a row
        name = infonce_pairs.IMPLS.resolve(backend, device, dtype, d=query.shape[1],
                                           work=query.shape[0] * (bank.shape[0] + query.shape[0]))
        rows, pairs = infonce_pairs.IMPLS[name].load()(
            query, positive, bank, temperature=temperature, batch_negatives=batch_negatives, labels=labels,
            bank_labels=bank_labels, normalize=normalize)
        return reduce_pairs(rows, pairs, reduction, query.dtype)
    impl = infonce.IMPLS[infonce.IMPLS.resolve(backend, device, dtype, d=query.shape[1])]
    if return_rank:
        rows, rank = impl.load()(query, positive, bank, temperature=temperature, return_rank=True)
        return reduce_rows(rows, reduction, query.dtype), rank
    if impl.one_block is not None:
        loss = impl.one_block(query, positive, bank, temperature, reduction)
        if loss is not None:
            return loss
    rows = impl.load()(query, positive, bank, temperature=temperature)
    return reduce_rows(rows, reduction, query.dtype)


_INFONCE_STRUCTURES: dict = {}


def _check_infonce_structure(query, positive, bank, batch_negatives, labels, bank_labels) -> torch.device:
    check.tensor("query", query, 2)
    if positive is None and labels is None:
        raise ValueError("positive is required unless labels are given (then same-label rows are the positives)")
    if positive is not None:
        check.tensor("positive", positive, 2)
    if not isinstance(bank, Tensor) or bank.dim() != 2 or bank.dtype not in check.FLOAT_DTYPES:
        check.tensor("bank", bank, 2)  # raises the usual message; an empty bank (0 rows) is allowed
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
    device = query.device
    others = (positive, bank, batch_negatives, labels, bank_labels if bank.shape[0] else None)
    if any(t is not None and t.device != device for t in others):
        check.same_device(query=query, positive=positive, bank=bank, batch_negatives=batch_negatives,
                          labels=labels, bank_labels=bank_labels if bank.shape[0] else None)  # raises
    for name, t in (("positive", positive), ("batch_negatives", batch_negatives)):
        if t is not None and t.shape != query.shape:
            raise ValueError(f"{name} must match query's shape {tuple(query.shape)}, got {tuple(t.shape)}")
    if query.shape[1] != bank.shape[1]:
        check.same_size("feature dim", **{"query.shape[1]": query.shape[1], "bank.shape[1]": bank.shape[1]})
    check.no_grad_input("bank", bank, "the bank holds constant negatives")
    return device


_PARAM_NAMES = tuple(f"params.{field}" for field in RelationalParams._fields)  # named once, not per call
_RELATIONAL_NAMES = ("e_t", "e_s", "queue_t", "queue_s", *_PARAM_NAMES)


def check_relational(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data) -> torch.device:
    if not isinstance(params, RelationalParams):
        raise TypeError(f"params must be a gdrd_fast.RelationalParams, got {type(params).__name__}")
    device = check.structure_checked(_RELATIONAL_STRUCTURES,
                                     lambda: _check_relational_structure(e_t, e_s, queue_t, queue_s, neg_idx, params),
                                     e_t, e_s, queue_t, queue_s, neg_idx, *params)
    check.positive("temperature", temperature)
    check.positive_int("n_data", n_data)
    check.index_in_range("neg_idx", neg_idx, queue_t.shape[0])
    check.finite_each(_RELATIONAL_NAMES, (e_t, e_s, queue_t, queue_s, *params))
    return device


_RELATIONAL_STRUCTURES: dict = {}


def _check_relational_structure(e_t, e_s, queue_t, queue_s, neg_idx, params) -> torch.device:
    check.tensor("e_t", e_t, 2)
    check.tensor("e_s", e_s, 2)
    check.tensor("queue_t", queue_t, 2)
    check.tensor("queue_s", queue_s, 2)
    check.tensor("neg_idx", neg_idx, 2, check.INDEX_DTYPES)
    for field, value in zip(_PARAM_NAMES, params):
        check.tensor(field, value, (1, 2))
    device = e_s.device
    if any(t.device != device for t in (e_t, queue_t, queue_s, neg_idx, *params)):
        check.same_device(e_t=e_t, e_s=e_s, queue_t=queue_t, queue_s=queue_s, neg_idx=neg_idx,
                          **dict(zip(_PARAM_NAMES, params)))  # raises
    if e_t.shape != e_s.shape:
        raise ValueError(f"e_t and e_s must have the same shape, got {tuple(e_t.shape)} and {tuple(e_s.shape)}")
    if e_t.shape[0] < 2:
        raise ValueError(f"the batch needs at least 2 samples to form pairs (i != j), got {e_t.shape[0]}")
    if queue_t.shape != queue_s.shape:
        raise ValueError(f"queue_t and queue_s must have the same shape, got {tuple(queue_t.shape)} "
                         f"and {tuple(queue_s.shape)}")
    if e_t.shape[1] != queue_t.shape[1]:
        check.same_size("embedding dim", **{"e_t.shape[1]": e_t.shape[1], "queue_t.shape[1]": queue_t.shape[1]})
    rel_dim = params.ft_w1.shape[0]
    for field, shape in relational_param_shapes(e_t.shape[1], rel_dim).items():
        check.shape(f"params.{field}", getattr(params, field), shape,
                    f"(embedding dim {e_t.shape[1]}, relation dim {rel_dim} = params.ft_w1.shape[0])")
    if e_t.shape[0] != neg_idx.shape[0]:
        check.same_size("batch size", **{"e_t.shape[0]": e_t.shape[0], "neg_idx.shape[0]": neg_idx.shape[0]})
    if neg_idx.shape[1] < 1:
        raise ValueError(f"neg_idx must hold at least one negative per partner, got shape {tuple(neg_idx.shape)}")
    check.no_grad_input("queue_t", queue_t, "queues hold constant keys")
    check.no_grad_input("queue_s", queue_s, "queues hold constant keys")
    return device


def _relational_dtype(e_s: Tensor, params: RelationalParams) -> torch.dtype:
    """What dispatch reads: the embeddings' dtype, or float64 where the parameters are (the keys are then)."""
    return torch.float64 if params.ft_w1.dtype == torch.float64 else e_s.dtype


def relational_contrastive_loss(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor,
                                neg_idx: Tensor, params: RelationalParams, *, temperature: float = 0.1,
                                log_z_t, log_z_s, n_data: int, reduction: str = "mean",
                                backend: str = "auto") -> Tensor:
    """CRRCD's relational contrastive loss, student side + teacher side (docs/ops/relational.md).

    Rows are all pairs (i, j), i != j; neg_idx[j] holds partner j's K queue negatives. 'none' gives the
    per-row [B(B-1)] sum of both sides.
    """
    check.reduction(reduction)
    device = check_relational(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data)
    log_z_t = check.log_z_value("log_z_t", log_z_t, e_s)
    log_z_s = check.log_z_value("log_z_s", log_z_s, e_s)
    rel_dim = params.ft_w1.shape[0]
    name = relational.IMPLS.resolve(backend, device, _relational_dtype(e_s, params), relation_dim=rel_dim,
                                    work=relational.small_call_work(e_s.shape[0], neg_idx.shape[1], rel_dim))
    rows = relational.IMPLS[name].load()(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature=temperature,
                                         log_z_t=log_z_t, log_z_s=log_z_s, n_data=n_data)
    return reduce_rows(rows, reduction, e_s.dtype)


def relational_log_z(e_t: Tensor, e_s: Tensor, queue_t: Tensor, queue_s: Tensor, neg_idx: Tensor,
                     params: RelationalParams, *, temperature: float = 0.1, n_data: int,
                     backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(log_z_t, log_z_s): each side's log(n_data * mean(exp(s / tau))) over its R(K+1) scores."""
    device = check_relational(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data)
    rel_dim = params.ft_w1.shape[0]
    name = relational.LOG_Z_IMPLS.resolve(backend, device, _relational_dtype(e_s, params), relation_dim=rel_dim,
                                          work=relational.small_call_work(e_s.shape[0], neg_idx.shape[1], rel_dim))
    return relational.LOG_Z_IMPLS[name].load()(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature=temperature,
                                               n_data=n_data)


_REGRESSION_NAMES = ("student", "teacher", "weight", "bias")


_REGRESSION_STRUCTURES: dict = {}


def _check_regression_structure(student: Tensor, teacher: Tensor, weight: Tensor,
                                bias: Tensor | None) -> tuple[torch.device, bool]:
    """(device, whether weight is a 1x1 Conv2d's [Ct, Cs, 1, 1], taken as it is and flattened only where a
    Python path runs)."""
    check.tensor("student", student, (2, 4))
    check.tensor("teacher", teacher, (2, 4))
    conv_weight = isinstance(weight, Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1)
    check.tensor("weight", weight, 4 if conv_weight else 2)
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
    check.no_grad_input("teacher", teacher, "the teacher's features are the target")
    return device, conv_weight


def feature_regression_loss(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None = None,
                            *, reduction: str = "mean", backend: str = "auto") -> Tensor:
    """mean((conv1x1(student, weight, bias) - teacher)^2): GDRD's stage-1 loss with its adapter.

    student [B, Cs, H, W] or [B, Cs], teacher [B, Ct, ...] (no grad), weight [Ct, Cs] (or [Ct, Cs, 1, 1]).
    'none' gives the per-sample mean [B].
    """
    check.reduction(reduction)
    device, conv_weight = check.structure_checked(
        _REGRESSION_STRUCTURES, lambda: _check_regression_structure(student, teacher, weight, bias),
        student, teacher, weight, bias)
    check.finite_each(_REGRESSION_NAMES, (student, teacher, weight, bias))
    impl = feature_regression.IMPLS[feature_regression.IMPLS.resolve(backend, device, student.dtype)]
    if impl.one_block is not None:
        loss = impl.one_block(student, teacher, weight, bias, reduction)
        if loss is not None:
            return loss
    rows = impl.load()(student, teacher, weight.flatten(1) if conv_weight else weight, bias)
    return reduce_rows(rows, reduction, student.dtype, row_size=math.prod(teacher.shape[1:]))


# --- memory bank and queue: in-place updates, validated before anything is written ---------------------
def check_bank_update(memory: Tensor, idx: Tensor, values: Tensor, n: int | None = None) -> torch.device:
    """idx [B] in [0, n) (n: the rows of the whole bank, memory's own by default), values [B, D] finite."""
    device = check.structure_checked(_BANK_UPDATE_STRUCTURES, lambda: _check_bank_update_structure(memory, idx, values),
                                     memory, idx, values)
    check.index_in_range("idx", idx, memory.shape[0] if n is None else n)
    check.finite("values", values)
    return device


_BANK_UPDATE_STRUCTURES: dict = {}


def _check_bank_update_structure(memory: Tensor, idx: Tensor, values: Tensor) -> torch.device:
    check.tensor("memory", memory, 2)
    check.tensor("idx", idx, 1, check.INDEX_DTYPES)
    check.tensor("values", values, 2)
    device = check.same_device(memory=memory, idx=idx, values=values)
    check.same_size("batch size", **{"idx.shape[0]": idx.shape[0], "values.shape[0]": values.shape[0]})
    check.same_size("feature dim", **{"values.shape[1]": values.shape[1], "memory.shape[1]": memory.shape[1]})
    return device


def bank_update_(memory: Tensor, idx: Tensor, values: Tensor, momentum: float, backend: str = "auto") -> None:
    """memory[idx] = normalize(m * memory[idx] + (1 - m) * values), from the rows before the call; the last
    duplicate of idx wins (RepDistiller's index_copy_)."""
    device = check_bank_update(memory, idx, values)
    check.in_unit_interval("momentum", momentum)
    update = memory_ops.IMPLS.load_for(backend, device, memory.dtype)
    with torch.no_grad():
        update(memory, idx, values.detach(), momentum)


def bank_update_pair_(memory_a: Tensor, values_a: Tensor, memory_b: Tensor, values_b: Tensor, idx: Tensor,
                      momentum: float, backend: str = "auto") -> None:
    """bank_update_ of two banks that share idx (CRD's student and teacher banks), in one launch."""
    device = check.structure_checked(_BANK_PAIR_STRUCTURES,
                                     lambda: _check_bank_pair_structure(memory_a, values_a, memory_b, values_b, idx),
                                     memory_a, values_a, memory_b, values_b, idx)
    check.index_in_range("idx", idx, memory_a.shape[0])
    check.finite("values", values_a)
    check.finite("values", values_b)
    check.in_unit_interval("momentum", momentum)
    run_bank_update_pair_(memory_a, values_a, memory_b, values_b, idx, momentum, backend, device)


_BANK_PAIR_STRUCTURES: dict = {}


def _check_bank_pair_structure(memory_a: Tensor, values_a: Tensor, memory_b: Tensor, values_b: Tensor,
                               idx: Tensor) -> torch.device:
    device = _check_bank_update_structure(memory_a, idx, values_a)
    _check_bank_update_structure(memory_b, idx, values_b)
    check.same_size("bank rows", **{"memory_a.shape[0]": memory_a.shape[0], "memory_b.shape[0]": memory_b.shape[0]})
    check.same_device(memory_a=memory_a, memory_b=memory_b)
    return device


def run_bank_update_pair_(memory_a: Tensor, values_a: Tensor, memory_b: Tensor, values_b: Tensor, idx: Tensor,
                          momentum: float, backend: str, device: torch.device) -> None:
    """bank_update_pair_ after its checks, for a caller that made them itself (CRDLoss)."""
    update = memory_ops.PAIR_IMPLS.load_for(backend, device, memory_a.dtype)
    with torch.no_grad():
        update(memory_a, values_a.detach(), memory_b, values_b.detach(), idx, momentum)


def queue_push_(queue: Tensor, ptr: Tensor, count: Tensor, values: Tensor, labels: Tensor | None = None,
                queue_labels: Tensor | None = None, backend: str = "auto") -> None:
    """Ring buffer: values (and labels) go to rows ptr, ptr + 1, ... (mod size), the newest `size` kept;
    ptr and count advance on the device (no host sync)."""
    device = check.structure_checked(
        _QUEUE_PUSH_STRUCTURES, lambda: _check_queue_push_structure(queue, ptr, count, values, labels, queue_labels),
        queue, ptr, count, values, labels, queue_labels)
    check.finite("values", values)
    run_queue_push_(queue, ptr, count, values, labels, queue_labels, backend, device)


_QUEUE_PUSH_STRUCTURES: dict = {}


def _check_queue_push_structure(queue: Tensor, ptr: Tensor, count: Tensor, values: Tensor, labels: Tensor | None,
                                queue_labels: Tensor | None) -> torch.device:
    check.tensor("queue", queue, 2)
    check.tensor("values", values, 2)
    if values.shape[1] != queue.shape[1]:
        check.same_size("feature dim", **{"values.shape[1]": values.shape[1], "queue.shape[1]": queue.shape[1]})
    if (labels is None) != (queue_labels is None):
        raise ValueError("labels and queue_labels go together: pass both or neither")
    if labels is not None:
        check.tensor("labels", labels, 1, check.INDEX_DTYPES)
        if labels.shape[0] != values.shape[0]:
            check.same_size("batch size", **{"values.shape[0]": values.shape[0], "labels.shape[0]": labels.shape[0]})
    device = queue.device
    if (ptr.device != device or count.device != device or values.device != device
            or (labels is not None and (labels.device != device or queue_labels.device != device))):
        check.same_device(queue=queue, ptr=ptr, count=count, values=values, labels=labels,
                          queue_labels=queue_labels)  # raises, naming each device
    return device


def run_queue_push_(queue: Tensor, ptr: Tensor, count: Tensor, values: Tensor, labels: Tensor | None,
                    queue_labels: Tensor | None, backend: str, device: torch.device) -> None:
    """queue_push_ after its checks, for a caller that made them itself (MemoryQueue.push_): checks run once,
    at the outermost layer."""
    push = memory_ops.PUSH_IMPLS.load_for(backend, device, queue.dtype)
    # values are detached and the other arguments are integer, so only a queue that asks for grad could
    # bring autograd in; otherwise no_grad would cost about as much host time as the kernel on a small push
    if queue.requires_grad:
        with torch.no_grad():
            push(queue, ptr, count, values.detach(), labels, queue_labels)
    else:
        push(queue, ptr, count, values.detach(), labels, queue_labels)


def queue_sample_negatives(queue_labels: Tensor | None, filled: int, partner_labels: Tensor, seed: Tensor, k: int,
                           backend: str = "auto") -> Tensor:
    """[B, k] int64 indices into the first `filled` rows, uniform with replacement (with queue_labels: over
    the rows of another class than partner_labels[b]; a row with none is all -1). The draws are a pure
    function of the one-element int64 seed, the same on every backend."""
    check.positive_int("filled", filled)
    check.positive_int("k", k)
    check.tensor("partner_labels", partner_labels, 1, check.INDEX_DTYPES)
    check.tensor("seed", seed, (0, 1), (torch.int64,))
    if queue_labels is not None:
        check.tensor("queue_labels", queue_labels, 1, check.INDEX_DTYPES)
        if filled > queue_labels.shape[0]:
            raise ValueError(f"filled = {filled} exceeds the queue's {queue_labels.shape[0]} rows")
    device = check.same_device(queue_labels=queue_labels, partner_labels=partner_labels, seed=seed)
    return run_queue_sample_negatives(queue_labels, filled, partner_labels, seed, k, backend, device)


def run_queue_sample_negatives(queue_labels: Tensor | None, filled: int, partner_labels: Tensor, seed: Tensor, k: int,
                               backend: str, device: torch.device) -> Tensor:
    """queue_sample_negatives after its checks, for a caller that made them itself (MemoryQueue)."""
    return memory_ops.SAMPLE_IMPLS.load_for(backend, device, torch.float32)(queue_labels, filled, partner_labels, seed,
                                                                           k)
