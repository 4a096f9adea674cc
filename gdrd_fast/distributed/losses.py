"""CRD and CRRCD losses whose value, gradients and state equal one process fed the global batch.

Their trainable heads need DDP's averaged gradients: wrap the loss in DistributedDataParallel, or the
module holding it with launch.wrap_ddp. Their buffers (banks, queues, log Z) are excluded from DDP's
buffer broadcast (it would cost N x D bytes a step, and break shards) because they are kept
identical on every rank by applying the same gathered update in rank order (the fix for
pytorch-metric-learning#639, where per-rank banks drift apart). See comm.py for the gradient rule.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional
from ..losses import CRDLoss, RelationalContrastiveLoss, _z_is_set
from . import comm
from .memory import ShardedMemoryBank


def shared_generator(device: torch.device, group=None) -> torch.Generator:
    """A generator on `device` seeded identically on every rank (rank 0 draws the seed from its global RNG)."""
    seed = torch.randint(2 ** 62, (1,), dtype=torch.long).to(device)
    if comm.is_active(group):
        dist.broadcast(seed, src=comm.src_rank(group), group=group)
    return torch.Generator(device=device).manual_seed(int(seed))


def _global_log_z(local_log_z: Tensor, sizes: list[int], scores_per_row: int, group) -> Tensor:
    """Merge per-rank log(n * mean(exp(s/T))) estimates into the estimate over the global batch."""
    if len(sizes) == 1:
        return local_log_z
    every = comm.gather_rows(local_log_z.reshape(1), [1] * len(sizes), group)
    counts = torch.tensor(sizes, dtype=every.dtype, device=every.device) * scores_per_row
    return torch.logsumexp(every + counts.log(), 0) - counts.sum().log()


class DistributedCRDLoss(CRDLoss):
    """CRDLoss (same arguments, same state_dict keys in replicated mode) over the global batch.

    Each rank scores its own samples against the bank (bank rows carry no gradient, so no gather with
    gradient is needed) and returns sum(row losses) * W / G, G the global batch: DDP's gradient average
    then equals one process's mean over G rows. log Z is estimated over the global batch. After the
    loss, (idx, v_s, v_t) of every rank are gathered and both banks apply the same update in rank
    order, so 'last duplicate wins' holds over the concatenated batch and banks stay bit-identical.
    Sampled negatives are drawn for the whole global batch and sliced, as one process would draw them.

    sharded=True: each rank holds N/W rows of each bank (ShardedMemoryBank); the rows a batch needs
    are fetched with all_to_all. Replicated banks are broadcast from rank 0 on the first forward.
    """

    def __init__(self, s_dim: int, t_dim: int, n_data: int, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, *, bank_dtype: torch.dtype = torch.float32,
                 sharded: bool = False, group=None, backend: str = "auto"):
        self.sharded, self.group = sharded, group  # read by make_bank during CRDLoss.__init__
        super().__init__(s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m, bank_dtype=bank_dtype,
                         backend=backend)
        self._banks_agreed = sharded  # shards differ by design; replicas are broadcast once
        comm.ddp_ignore_buffers(self)

    def make_bank(self, n: int, dim: int, momentum: float, dtype: torch.dtype, backend: str) -> nn.Module:
        if self.sharded:
            return ShardedMemoryBank(n, dim, momentum, dtype, group=self.group, backend=backend)
        return super().make_bank(n, dim, momentum, dtype, backend)

    def sample_idx(self, idx: Tensor, sizes: list[int] | None = None) -> Tensor:
        """[B, K+1]: idx, then this rank's rows of K uniform negatives drawn for the global batch."""
        sizes = sizes or [idx.shape[0]]
        offset = sum(sizes[:comm.rank(self.group)])
        negatives = torch.randint(self.n_data, (sum(sizes), self.nce_k), generator=self.generator,
                                  device=idx.device, dtype=idx.dtype)
        return torch.cat([idx[:, None], negatives[offset:offset + idx.shape[0]]], 1)

    def _agree_on_banks(self) -> None:
        if comm.is_active(self.group):
            for bank in (self.memory_s, self.memory_t):
                dist.broadcast(bank.rows, src=comm.src_rank(self.group), group=self.group)
        self._banks_agreed = True

    def _rows_for(self, contrast_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(student bank, teacher bank, idx into them): whole replicas, or just the fetched rows."""
        if not self.sharded:
            return self.memory_s.rows, self.memory_t.rows, contrast_idx
        ids, local_idx = torch.unique(contrast_idx, return_inverse=True)
        return self.memory_s.fetch(ids), self.memory_t.fetch(ids), local_idx

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor, contrast_idx: Tensor | None = None) -> Tensor:
        if contrast_idx is not None and (contrast_idx.dim() != 2 or contrast_idx.shape[0] != idx.shape[0]):
            raise ValueError(f"contrast_idx must be [B, K+1] with B={idx.shape[0]}, got {tuple(contrast_idx.shape)}")
        if not self._banks_agreed:
            self._agree_on_banks()
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        sizes = comm.batch_sizes(idx.shape[0], idx.device, self.group)
        if contrast_idx is None:
            contrast_idx = self.sample_idx(idx, sizes)
        bank_s, bank_t, bank_idx = self._rows_for(contrast_idx)
        kw = dict(temperature=self.nce_t, n_data=self.n_data)
        if not _z_is_set(self, "log_z_s", "log_z_t"):
            scores_per_row = contrast_idx.shape[1]
            self.log_z_s.copy_(_global_log_z(functional.crd_log_z(v_s, bank_t, bank_idx, **kw),
                                             sizes, scores_per_row, self.group))
            self.log_z_t.copy_(_global_log_z(functional.crd_log_z(v_t, bank_s, bank_idx, **kw),
                                             sizes, scores_per_row, self.group))
            self._z_set = True
        kw.update(reduction="sum", backend=self.backend)
        loss = (functional.crd_nce_loss(v_s, bank_t, bank_idx, log_z=self.log_z_s, **kw)
                + functional.crd_nce_loss(v_t, bank_s, bank_idx, log_z=self.log_z_t, **kw))
        loss = loss * (len(sizes) / sum(sizes))
        every_idx = comm.gather_rows(idx, sizes, self.group)
        every_v = comm.gather_rows(torch.cat([v_s, v_t], 1).detach(), sizes, self.group)
        self.memory_s.update_(every_idx, every_v[:, :v_s.shape[1]])
        self.memory_t.update_(every_idx, every_v[:, v_s.shape[1]:])
        return loss


class DistributedRelationalContrastiveLoss(RelationalContrastiveLoss):
    """RelationalContrastiveLoss over the global batch: every rank computes the same global loss.

    e_t and labels are gathered without gradient, e_s with gradient (its backward sums over ranks),
    and the base forward runs on the concatenation, so every rank samples the same negatives, pushes
    the same rows to its queues and returns the same L. Each rank's loss is L, so DDP's average is L
    too (rule 1 in comm.py). Cost: every rank does the global batch's pair work.
    Negatives come from `self.generator` if set (seed it identically on every rank), else from a
    generator seeded each step by rank 0's global RNG (which checkpoints carry, so resume is exact).
    """

    def __init__(self, *args, group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        comm.ddp_ignore_buffers(self)

    def forward(self, e_t: Tensor, e_s: Tensor, labels: Tensor) -> Tensor:
        sizes = comm.batch_sizes(e_s.shape[0], e_s.device, self.group)
        every = (comm.gather_rows(e_t, sizes, self.group), comm.gather_rows_with_grad(e_s, sizes, self.group),
                 comm.gather_rows(labels, sizes, self.group))
        if self.generator is not None:
            return super().forward(*every)
        self.generator = shared_generator(labels.device, self.group)
        try:
            return super().forward(*every)
        finally:
            self.generator = None
