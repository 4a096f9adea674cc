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

from ..losses import CRDLoss, RelationalContrastiveLoss
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

    # --- CRDLoss's hooks over the global batch -------------------------------------------------------
    def prepare(self) -> None:
        """Replicated banks start as rank 0's (each rank initialised its own at random)."""
        if not self._banks_agreed:
            if comm.is_active(self.group):
                for bank in (self.memory_s, self.memory_t):
                    dist.broadcast(bank.rows, src=comm.src_rank(self.group), group=self.group)
            self._banks_agreed = True

    def batch_sizes(self, idx: Tensor) -> list[int]:
        return comm.batch_sizes(idx.shape[0], idx.device, self.group)

    def bank_rows(self, contrast_idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(student bank, teacher bank, idx into them): whole replicas, or just the fetched rows."""
        if not self.sharded:
            return self.memory_s.rows, self.memory_t.rows, contrast_idx
        ids, local_idx = torch.unique(contrast_idx, return_inverse=True)
        return self.memory_s.fetch(ids), self.memory_t.fetch(ids), local_idx

    def estimate_log_z(self, v_s, v_t, bank_s, bank_t, bank_idx, sizes):
        local_s, local_t = super().estimate_log_z(v_s, v_t, bank_s, bank_t, bank_idx, sizes)
        scores_per_row = bank_idx.shape[1]
        return (_global_log_z(local_s, sizes, scores_per_row, self.group),
                _global_log_z(local_t, sizes, scores_per_row, self.group))

    def loss_scale(self, sizes: list[int]) -> float:
        """sum(row losses) * W / G: DDP's gradient average then equals one process's mean over G rows."""
        return len(sizes) / sum(sizes)

    def update_banks(self, idx: Tensor, v_s: Tensor, v_t: Tensor, sizes: list[int]) -> None:
        """Every rank applies the gathered batch in rank order, so the banks stay identical."""
        every_idx = comm.gather_rows(idx, sizes, self.group)
        every_v = comm.gather_rows(torch.cat([v_s, v_t], 1), sizes, self.group)
        every_s, every_t = every_v[:, :v_s.shape[1]], every_v[:, v_s.shape[1]:]
        if self.sharded:
            self.memory_s.update_(every_idx, every_s)
            self.memory_t.update_(every_idx, every_t)
        else:
            super().update_banks(every_idx, every_s, every_t, sizes)


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
        self.check_inputs(e_t, e_s, labels, pairs=False)  # this rank's part, before any collective or draw
        sizes = comm.batch_sizes(e_s.shape[0], e_s.device, self.group)
        every = (comm.gather_rows(e_t, sizes, self.group), comm.gather_rows_with_grad(e_s, sizes, self.group),
                 comm.gather_rows(labels, sizes, self.group))
        if self.generator is not None:
            return super().forward(*every)
        global_rng = torch.get_rng_state()  # shared_generator draws its seed from it
        self.generator = shared_generator(labels.device, self.group)
        try:
            return super().forward(*every)
        except BaseException:
            torch.set_rng_state(global_rng)
            raise
        finally:
            self.generator = None
