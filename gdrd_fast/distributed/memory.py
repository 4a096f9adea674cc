"""ShardedMemoryBank: an id-indexed bank split over the ranks, for N too big to replicate.

The replicated mode keeps a whole MemoryBank on every rank: 2 banks x N x D x bytes per rank (CRD at
N = 17M, D = 128, fp32: 16 GiB on every GPU, RepDistiller#40). Sharded, rank r holds the contiguous rows
[r * ceil(N/W), (r+1) * ceil(N/W)) and the memory per rank drops W-fold. Rows are read with fetch()
(one all_to_all of the requested ids and one of the rows); update_() takes the GLOBAL batch, the same
call on every rank, and each rank applies the rows it owns, so the bank's logical content equals a
MemoryBank given the same calls.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import validation as check
from .. import functional
from . import comm


def _exchange(send: Tensor, send_counts: list[int], recv_counts: list[int], group) -> Tensor:
    """all_to_all_single of rows: send[...] split by send_counts, received split by recv_counts."""
    out = send.new_empty((sum(recv_counts), *send.shape[1:]))
    dist.all_to_all_single(out, send.contiguous(), recv_counts, send_counts, group=group)
    return out


class ShardedMemoryBank(nn.Module):
    """The rows of an N x dim bank that this rank owns; same update rule as gdrd_fast.MemoryBank.

    `rows` is this rank's shard (its state_dict is per rank: save one file per rank). Initialised
    uniform(-a, a), a = 1/sqrt(dim/3), like MemoryBank, from `generator` (or the global RNG).
    """

    def __init__(self, n: int, dim: int, momentum: float = 0.5, dtype: torch.dtype = torch.float32, *,
                 group=None, generator: torch.Generator | None = None, backend: str = "auto"):
        super().__init__()
        if n <= 0 or dim <= 0:
            raise ValueError(f"n and dim must be positive, got n={n}, dim={dim}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.group = group
        self.world, self.rank = comm.world_size(group), comm.rank(group)
        self.total, self.block = n, math.ceil(n / self.world)
        self.start = min(n, self.rank * self.block)
        self.stop = min(n, self.start + self.block)
        bound = 1.0 / math.sqrt(dim / 3)
        rows = torch.rand(self.stop - self.start, dim, generator=generator).mul_(2 * bound).sub_(bound)
        self.register_buffer("rows", rows.to(dtype))
        self.momentum, self.backend = momentum, backend

    @property
    def n(self) -> int:
        return self.total

    def _owner(self, idx: Tensor) -> Tensor:
        return torch.div(idx, self.block, rounding_mode="floor")

    def update_(self, idx: Tensor, values: Tensor) -> None:
        """rows[idx] = normalize(m * rows[idx] + (1 - m) * values) for the owned ids; last duplicate wins.

        idx / values are the global batch (identical on every rank), e.g. from comm.gather_rows.
        """
        functional.check_bank_update(self.rows, idx, values, n=self.n)
        mine = self._owner(idx) == self.rank  # order is kept, so 'last duplicate wins' still holds
        local_idx = idx[mine] - self.start
        if local_idx.numel():
            functional.bank_update_(self.rows, local_idx, values[mine], self.momentum, self.backend)

    def fetch(self, idx: Tensor) -> Tensor:
        """[len(idx), dim] rows of the global bank for this rank's idx (collective: call on every rank)."""
        check.tensor("idx", idx, 1, check.INDEX_DTYPES)
        check.same_device(rows=self.rows, idx=idx)
        check.index_in_range("idx", idx, self.n)
        if not comm.is_active(self.group):
            return self.rows[idx.long()]
        idx = idx.long()
        owner = self._owner(idx)
        order = torch.argsort(owner, stable=True)
        send_counts = torch.bincount(owner, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()
        requested = _exchange(idx[order], send_counts, recv_counts, self.group)
        answered = _exchange(self.rows[requested - self.start], recv_counts, send_counts, self.group)
        rows = torch.empty_like(answered)
        rows[order] = answered
        return rows

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A whole bank's rows (a single-process or replicated checkpoint) load as this rank's slice."""
        key = prefix + "rows"
        rows = state_dict.get(key)
        if rows is not None and rows.shape[0] == self.total != self.stop - self.start:
            state_dict[key] = rows[self.start:self.stop].clone()  # a clone: `assign` must not keep the whole bank
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"n={self.n}, dim={self.rows.shape[1]}, shard=[{self.start}, {self.stop}), "
                f"momentum={self.momentum}, dtype={self.rows.dtype}")
