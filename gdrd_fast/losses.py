"""nn.Module forms of the losses: hyper-parameters and state in __init__, tensors in forward."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends, functional
from . import validation as check
from .integrations import repdistiller
from .memory import MemoryBank, MemoryQueue
from .ops import crd_nce
from .ops import memory as memory_ops
from .reference import RelationalParams


def _z_is_set(module: nn.Module, *names: str) -> bool:
    """A NaN log-Z buffer means 'not estimated yet'; reading it syncs, so only until it is set."""
    if not module._z_set:
        module._z_set = all(not bool(torch.isnan(getattr(module, n))) for n in names)
    return module._z_set


def _z_cache(module: nn.Module) -> None:
    module._z_set = False
    module._register_load_state_dict_pre_hook(lambda *a, **k: setattr(module, "_z_set", False))


class Embed(nn.Module):
    """Linear then L2-normalise: CRD's embedding head."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(nn.Module):
    """Drop-in for RepDistiller's CRDLoss: forward(f_s, f_t, idx, contrast_idx=None) -> scalar.

    Both banks, both normalisers (NaN until the first batch sets them) and the embeddings live here,
    so state_dict round-trips. Without contrast_idx, K negatives per sample are drawn uniformly from
    all N rows with `self.generator` (None = the global RNG of the device).
    RepDistiller's `CRDLoss(opt)` works too (opt.s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m),
    and load_state_dict accepts a RepDistiller criterion's state (gdrd_fast.integrations.repdistiller).
    """

    eps = 1e-7  # RepDistiller's NCE eps

    def __init__(self, s_dim: int, t_dim: int | None = None, n_data: int | None = None, feat_dim: int = 128,
                 nce_k: int = 16384, nce_t: float = 0.07, nce_m: float = 0.5, *,
                 bank_dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        if t_dim is None and n_data is None and not isinstance(s_dim, int):  # RepDistiller's CRDLoss(opt)
            s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m = repdistiller.crd_args_from_opt(s_dim)
        if t_dim is None or n_data is None:
            raise TypeError("CRDLoss needs (s_dim, t_dim, n_data, ...) or RepDistiller's opt object")
        if nce_k <= 0 or n_data <= 0:
            raise ValueError(f"nce_k and n_data must be positive, got nce_k={nce_k}, n_data={n_data}")
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.memory_s = self.make_bank(n_data, feat_dim, nce_m, bank_dtype, backend)
        self.memory_t = self.make_bank(n_data, feat_dim, nce_m, bank_dtype, backend)
        self.register_buffer("log_z_s", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("log_z_t", torch.tensor(float("nan"), dtype=torch.float64))
        self.n_data, self.nce_k, self.nce_t = n_data, nce_k, nce_t
        self.backend = backend
        self.generator: torch.Generator | None = None
        _z_cache(self)
        self._register_load_state_dict_pre_hook(self._from_repdistiller)

    def _from_repdistiller(self, state_dict, prefix, *args) -> None:
        repdistiller.convert_crd_state(state_dict, prefix, nce_k=self.nce_k, nce_t=self.nce_t,
                                       nce_m=self.memory_s.momentum)

    def make_bank(self, n: int, dim: int, momentum: float, dtype: torch.dtype, backend: str) -> nn.Module:
        """One of the two id-indexed banks (gdrd_fast.distributed.DistributedCRDLoss may shard it)."""
        return MemoryBank(n, dim, momentum, dtype, backend=backend)

    def sample_idx(self, idx: Tensor) -> Tensor:
        negatives = torch.randint(self.n_data, (idx.shape[0], self.nce_k), generator=self.generator,
                                  device=idx.device, dtype=idx.dtype)
        return torch.cat([idx[:, None], negatives], 1)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        check.tensor("idx", idx, 1, check.INDEX_DTYPES)
        check.index_in_range("idx", idx, self.n_data)
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        if contrast_idx is None:
            contrast_idx = self.sample_idx(idx)
        elif contrast_idx.dim() != 2 or contrast_idx.shape[0] != idx.shape[0]:
            raise ValueError(f"contrast_idx must be [B, K+1] with B={idx.shape[0]}, got {tuple(contrast_idx.shape)}")
        bank_s, bank_t = self.memory_s.rows, self.memory_t.rows
        # every check before the first write: a failed call leaves banks and normalisers as they were
        device, n_data = functional._check_crd(v_s, bank_t, contrast_idx, self.nce_t, self.n_data)
        # v_t and bank_s have the shapes of v_s and bank_t once the batch sizes agree
        check.same_size("batch size", **{"f_s.shape[0]": f_s.shape[0], "f_t.shape[0]": f_t.shape[0]})
        check.finite("embed_t(f_t)", v_t)
        if not _z_is_set(self, "log_z_s", "log_z_t"):
            # RepDistiller freezes Z on the first batch: out_s scores v_s against the teacher bank
            self.log_z_s.copy_(functional.crd_log_z(v_s, bank_t, contrast_idx, temperature=self.nce_t, n_data=n_data))
            self.log_z_t.copy_(functional.crd_log_z(v_t, bank_s, contrast_idx, temperature=self.nce_t, n_data=n_data))
            self._z_set = True
        name = backends.resolve("CRDLoss", crd_nce.PAIR_IMPLS, self.backend, device)
        if name == "torch":
            kw = dict(temperature=self.nce_t, n_data=n_data, eps=self.eps, backend="torch")
            loss = (functional.crd_nce_loss(v_s, bank_t, contrast_idx, log_z=self.log_z_s, **kw)
                    + functional.crd_nce_loss(v_t, bank_s, contrast_idx, log_z=self.log_z_t, **kw))
        else:  # both sides in one pass over contrast_idx
            c = (contrast_idx.shape[1] - 1) / n_data
            rows_s, _, rows_t, _ = crd_nce.crd_nce_pair_op(
                v_s, bank_t.detach(), self.log_z_s, v_t, bank_s.detach(), self.log_z_t, contrast_idx, self.nce_t,
                c, self.eps, name, torch.is_grad_enabled() and (v_s.requires_grad or v_t.requires_grad))
            loss = (rows_s.sum() + rows_t.sum()) / idx.shape[0]
        memory_ops.bank_update_pair_(bank_s, v_s.detach(), bank_t, v_t.detach(), idx, self.memory_s.momentum,
                                     self.backend)
        return loss


class InfoNCEBankLoss(nn.Module):
    """InfoNCE against a shared negative bank: forward(query, positive, bank, **options), the options
    (batch_negatives, labels, bank_labels) and normalize as in gdrd_fast.infonce_bank_loss."""

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", backend: str = "auto",
                 normalize: bool = False):
        super().__init__()
        self.temperature, self.reduction, self.backend = temperature, reduction, backend
        self.normalize = normalize

    def forward(self, query: Tensor, positive: Tensor | None, bank: Tensor, *,
                batch_negatives: Tensor | None = None, labels: Tensor | None = None,
                bank_labels: Tensor | None = None) -> Tensor:
        return functional.infonce_bank_loss(query, positive, bank, temperature=self.temperature,
                                            reduction=self.reduction, backend=self.backend,
                                            batch_negatives=batch_negatives, normalize=self.normalize,
                                            labels=labels, bank_labels=bank_labels)


class FeatureRegressionLoss(nn.Module):
    """Owns the 1x1-conv adapter (cs -> ct channels): forward(student, teacher) -> MSE."""

    def __init__(self, cs: int, ct: int, bias: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.adapter = nn.Conv2d(cs, ct, kernel_size=1, bias=bias)
        self.reduction, self.backend = reduction, backend

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return functional.feature_regression_loss(student, teacher, self.adapter.weight, self.adapter.bias,
                                                  reduction=self.reduction, backend=self.backend)


class RelationalContrastiveLoss(nn.Module):
    """CRRCD's relational contrastive distillation: forward(e_t, e_s, labels) -> scalar.

    Owns F_t, F_ts, the critic heads h1, h2, the (e_t, e_s, label) queue and both frozen normalisers.
    Returns 0 (with a zero graph) until the queue is full, then freezes Z on the first active step.
    """

    def __init__(self, embed_dim: int = 512, rel_dim: int = 128, num_negatives: int = 512,
                 queue_size: int = 16384, temperature: float = 0.1, *, n_data: int, supervised: bool = True,
                 backend: str = "auto"):
        super().__init__()
        if num_negatives <= 0 or n_data <= 0:
            raise ValueError(f"num_negatives and n_data must be positive, got {num_negatives}, {n_data}")

        def weight(rows, cols):
            w = torch.empty(rows, cols)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            return nn.Parameter(w)

        def bias(n, fan_in):
            return nn.Parameter(torch.empty(n).uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in)))

        self.ft_w1, self.ft_b1 = weight(rel_dim, embed_dim), bias(rel_dim, embed_dim)
        self.ft_w2, self.ft_b2 = weight(rel_dim, rel_dim), bias(rel_dim, rel_dim)
        self.fts_u, self.fts_v = weight(rel_dim, embed_dim), weight(rel_dim, embed_dim)
        self.fts_b1 = bias(rel_dim, embed_dim)
        self.fts_w2, self.fts_b2 = weight(rel_dim, rel_dim), bias(rel_dim, rel_dim)
        self.h1_w, self.h1_b = weight(rel_dim, rel_dim), bias(rel_dim, rel_dim)
        self.h2_w, self.h2_b = weight(rel_dim, rel_dim), bias(rel_dim, rel_dim)
        # the queues have compiled kernels for 'cpu' and 'cuda' only: any other backend leaves them on 'auto'
        queue_backend = backend if backend in ("torch", *memory_ops.PUSH_IMPLS) else "auto"
        self.queue_t = MemoryQueue(queue_size, embed_dim, with_labels=True, backend=queue_backend)
        self.queue_s = MemoryQueue(queue_size, embed_dim, with_labels=False, backend=queue_backend)
        self.register_buffer("log_z_t", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer("log_z_s", torch.tensor(float("nan"), dtype=torch.float64))
        self.num_negatives, self.temperature, self.n_data = num_negatives, temperature, n_data
        self.supervised, self.backend = supervised, backend
        self.generator: torch.Generator | None = None
        _z_cache(self)

    def params(self) -> RelationalParams:
        return RelationalParams(*(getattr(self, name) for name in RelationalParams._fields))

    def forward(self, e_t: Tensor, e_s: Tensor, labels: Tensor) -> Tensor:
        e_t = e_t.detach()
        if not self.queue_t.is_full():
            loss = e_s.sum() * 0.0 + sum(p.sum() for p in self.parameters()) * 0.0
        else:
            if self.supervised:  # negatives of partner j come from other classes than y_j
                neg_idx = self.queue_t.sample_negatives(labels, self.num_negatives, self.generator)
            else:
                neg_idx = torch.randint(self.queue_t.size, (labels.shape[0], self.num_negatives),
                                        generator=self.generator, device=labels.device)
            args = (e_t, e_s, self.queue_t.values, self.queue_s.values, neg_idx, self.params())
            kw = dict(temperature=self.temperature, n_data=self.n_data, backend=self.backend)
            if not _z_is_set(self, "log_z_t", "log_z_s"):
                log_z_t, log_z_s = functional.relational_log_z(*args, **kw)
                self.log_z_t.copy_(log_z_t)
                self.log_z_s.copy_(log_z_s)
                self._z_set = True
            loss = functional.relational_contrastive_loss(*args, log_z_t=self.log_z_t, log_z_s=self.log_z_s, **kw)
        self.queue_t.push_(e_t, labels)
        self.queue_s.push_(e_s.detach())
        return loss
