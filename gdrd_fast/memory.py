"""MemoryBank (id-indexed, momentum-updated) and MemoryQueue (FIFO ring buffer with labels).

All state lives in buffers, so state_dict round-trips and checkpoints carry the banks (ops.md section 5).
Every method validates before it writes: a failed call leaves the state untouched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import validation as check
from .ops import memory as memory_ops


def check_bank_update(rows: Tensor, n: int, idx: Tensor, values: Tensor) -> None:
    """The argument checks of a bank update over `n` global rows, all before anything is written."""
    check.tensor("idx", idx, 1, check.INDEX_DTYPES)
    check.tensor("values", values, 2)
    check.same_device(rows=rows, idx=idx, values=values)
    check.same_size("batch size", **{"idx.shape[0]": idx.shape[0], "values.shape[0]": values.shape[0]})
    check.same_size("feature dim", **{"values.shape[1]": values.shape[1], "rows.shape[1]": rows.shape[1]})
    check.index_in_range("idx", idx, n)
    check.finite("values", values)


class MemoryBank(nn.Module):
    """N rows of `dim` features, initialised uniform(-a, a) with a = 1/sqrt(dim/3) as in RepDistiller."""

    def __init__(self, n: int, dim: int, momentum: float = 0.5, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, backend: str = "auto"):
        super().__init__()
        if n <= 0 or dim <= 0:
            raise ValueError(f"n and dim must be positive, got n={n}, dim={dim}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        bound = 1.0 / math.sqrt(dim / 3)
        rows = torch.rand(n, dim, generator=generator).mul_(2 * bound).sub_(bound)
        self.register_buffer("rows", rows.to(dtype))
        self.momentum = momentum
        self.backend = backend

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def update_(self, idx: Tensor, values: Tensor) -> None:
        """rows[idx] = normalize(m * rows[idx] + (1 - m) * values); the last duplicate of idx wins."""
        check_bank_update(self.rows, self.n, idx, values)
        with torch.no_grad():
            memory_ops.bank_update_(self.rows, idx, values, self.momentum, self.backend)

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.rows.shape[1]}, momentum={self.momentum}, dtype={self.rows.dtype}"


class MemoryQueue(nn.Module):
    """FIFO ring buffer of `size` rows (and labels); pointer and fill count are buffers too."""

    def __init__(self, size: int, dim: int, with_labels: bool = True, dtype: torch.dtype = torch.float32,
                 backend: str = "auto"):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"size and dim must be positive, got size={size}, dim={dim}")
        self.register_buffer("values", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long) if with_labels else None)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.backend = backend
        self._full = False  # cached: a full queue stays full, so count is read only until then
        self._register_load_state_dict_pre_hook(self._forget_cache)

    def _forget_cache(self, *args, **kwargs):
        self._full = False

    @property
    def size(self) -> int:
        return self.values.shape[0]

    def is_full(self) -> bool:
        if not self._full:
            self._full = int(self.count) >= self.size
        return self._full

    def push_(self, values: Tensor, labels: Tensor | None = None) -> None:
        """Append rows (oldest overwritten first); only the newest `size` of a long push are kept."""
        check.tensor("values", values, 2)
        check.same_size("feature dim", **{"values.shape[1]": values.shape[1], "queue dim": self.values.shape[1]})
        if self.labels is not None:
            if labels is None:
                raise ValueError("labels are required: this queue was built with_labels=True")
            check.tensor("labels", labels, 1, check.INDEX_DTYPES)
            check.same_size("batch size", **{"values.shape[0]": values.shape[0], "labels.shape[0]": labels.shape[0]})
        check.same_device(queue=self.values, values=values, labels=labels)
        check.finite("values", values)
        with torch.no_grad():
            memory_ops.queue_push_(self.values, self.ptr, self.count, values, labels, self.labels, self.backend)

    def sample_negatives(self, partner_labels: Tensor, k: int,
                         generator: torch.Generator | None = None) -> Tensor:
        """[B, k] queue indices drawn uniformly with replacement from the filled rows.

        With labels, only rows whose label differs from the partner's; a partner with no such row
        raises. A queue without labels samples from all filled rows (partner_labels gives B).
        The draws are a pure function of one int64 seed taken from `generator` (or the queue device's
        default generator): the same seed gives the same indices on every backend (csrc/sampling.h), so a
        CPU generator seeded alike gives a CPU and a GPU queue the same indices.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
            raise ValueError(f"k must be a positive int, got {k!r}")
        filled = self.size if self.is_full() else int(self.count)
        if filled == 0:
            raise ValueError("the queue is empty: push_ before sampling")
        check.tensor("partner_labels", partner_labels, 1, check.INDEX_DTYPES)
        check.same_device(queue=self.values, partner_labels=partner_labels)
        # drawn on the generator's own device: one CPU generator gives the same draws for a CPU or a GPU queue
        seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), generator=generator,
                             device=generator.device if generator is not None else self.values.device)
        seed = seed.to(self.values.device, non_blocking=True)
        idx = memory_ops.queue_sample_negatives(self.labels, filled, partner_labels, seed, k, self.backend)
        if self.labels is not None:
            missing = idx[:, 0] < 0
            if bool(missing.any()):  # one host sync: a silent -1 would index the wrong row later
                bad = int(torch.nonzero(missing)[0, 0])
                raise ValueError(f"partner_labels[{bad}] = {int(partner_labels[bad])}: every queued row has "
                                 "this label, so no negative of another class exists")
        return idx

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.values.shape[1]}, labels={self.labels is not None}, "
                f"backend={self.backend!r}")
