"""MemoryBank (id-indexed, momentum-updated) and MemoryQueue (FIFO ring buffer with labels).

All state lives in buffers, so state_dict round-trips and checkpoints carry the banks (docs/ops/memory.md).
Every method validates before it writes: a failed call leaves the state untouched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import backends
from . import collectives as comm
from . import functional
from . import validation as check


def default_generator(device: torch.device) -> torch.Generator:
    """The generator torch draws from on `device` when none is given."""
    if backends.device_type(device) == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def draw_seed(generator: torch.Generator) -> Tensor:
    """The sampler's seed: one int64 drawn from `generator` on its own device, torch.randint(-2**63, 2**63 - 1)
    (for a CPU generator by gdrd_fast._C.draw_seed, the same draw at a fifth of the host time)."""
    draw = backends.host_function("draw_seed")
    seed = draw(generator) if draw is not None else None
    if seed is None:
        seed = torch.randint(-2 ** 63, 2 ** 63 - 1, (1,), generator=generator, device=generator.device)
    return seed


class MemoryBank(nn.Module):
    """N rows of `dim` features, initialised uniform(-a, a) with a = 1/sqrt(dim/3) as in RepDistiller."""

    def __init__(self, n: int, dim: int, momentum: float = 0.5, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, backend: str = "auto"):
        super().__init__()
        check.all_at_once(type(self).__name__, lambda: check.positive_int("n", n), lambda: check.positive_int("dim", dim),
                          lambda: check.in_unit_interval("momentum", momentum),
                          lambda: check.float_dtype("dtype", dtype), lambda: functional.check_backend("bank_update_", backend))
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
        functional.bank_update_(self.rows, idx, values, self.momentum, self.backend)

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.rows.shape[1]}, momentum={self.momentum}, dtype={self.rows.dtype}"


class MemoryQueue(nn.Module):
    """FIFO ring buffer of `size` rows (and, opt-in, labels); pointer and fill count are buffers too.

    gather=True: under torch.distributed every push_ first gathers all ranks' rows in rank order (MoCo's
    concat_all_gather), so every rank holds the same queue; without a process group it is a no-op.
    """

    def __init__(self, size: int, dim: int, with_labels: bool = False, dtype: torch.dtype = torch.float32,
                 backend: str = "auto", *, gather: bool = False, group=None):
        super().__init__()
        check.all_at_once(type(self).__name__, lambda: check.positive_int("size", size),
                          lambda: check.positive_int("dim", dim), lambda: check.float_dtype("dtype", dtype),
                          lambda: functional.check_backend("queue_push_", backend))
        self.register_buffer("values", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long) if with_labels else None)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.backend = backend
        self.gather, self.group = gather, group
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
        # buffers read once from the dict (nn.Module's __getattr__ costs more than the kernel on small pushes)
        buffers = self._buffers
        queue, queue_labels = buffers["values"], buffers["labels"]
        device = check.structure_checked(_PUSH_STRUCTURES, lambda: _check_push(queue, queue_labels, values, labels),
                                         queue, queue_labels, values, labels)
        check.finite("values", values)
        if self.gather:
            values, labels = self._gather(values, labels)
        # every check of functional.queue_push_ is made above (the buffers are the queue's own)
        functional.run_queue_push_(queue, buffers["ptr"], buffers["count"], values, labels, queue_labels,
                                   self.backend, device)

    def _gather(self, values: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Every rank's rows (and labels) in rank order; batches may differ in size between ranks."""
        if not comm.is_active(self.group):
            return values, labels
        sizes = comm.batch_sizes(values.shape[0], values.device, self.group)
        return (comm.gather_rows(values, sizes, self.group),
                None if labels is None else comm.gather_rows(labels, sizes, self.group))

    def num_filled(self) -> int:
        """How many rows hold pushed values (reads the count once, until the queue is full)."""
        return self._buffers["values"].shape[0] if self.is_full() else int(self.count)

    def _filled_slice(self, buffer: Tensor, skip_newest: int) -> Tensor:
        if not isinstance(skip_newest, int) or not 0 <= skip_newest <= self.num_filled():
            raise ValueError(f"skip_newest must be an int in [0, {self.num_filled()}] (rows filled), "
                             f"got {skip_newest!r}")
        if not self.is_full():
            return buffer[:self.num_filled() - skip_newest]
        if skip_newest == 0:
            return buffer
        # a full ring's oldest row sits at ptr: keep the oldest size - skip_newest rows
        keep = torch.arange(self.size - skip_newest, device=buffer.device)
        return buffer[(keep + self.ptr) % self.size]

    def filled(self, skip_newest: int = 0) -> Tensor:
        """The rows written so far (a view in slot order; an empty queue gives 0 rows), the negatives
        a MoCo-style loss should see. skip_newest drops the latest pushes' rows (a copy, oldest first)."""
        return self._filled_slice(self.values, skip_newest)

    def filled_labels(self, skip_newest: int = 0) -> Tensor:
        """The labels of filled(skip_newest), row for row."""
        if self.labels is None:
            raise ValueError("this queue has no labels: build it with with_labels=True")
        return self._filled_slice(self.labels, skip_newest)

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
        filled = self.num_filled()
        if filled == 0:
            raise ValueError("the queue is empty: push_ before sampling")
        check.tensor("partner_labels", partner_labels, 1, check.INDEX_DTYPES)
        queue_labels, device = self._buffers["labels"], self._buffers["values"].device  # read once, as in push_
        if partner_labels.device != device:
            check.same_device(queue=self.values, partner_labels=partner_labels)  # raises, naming each device
        if queue_labels is not None and check.value_checks(partner_labels):
            self._check_partners_have_negatives(queue_labels, partner_labels, filled)
        # drawn on the generator's own device: one CPU generator gives the same draws for a CPU or a GPU queue
        seed = draw_seed(generator if generator is not None else default_generator(device))
        if seed.device != device:
            seed = seed.to(device, non_blocking=True)
        # every check of functional.queue_sample_negatives is made above (filled and the labels are the queue's own)
        return functional.run_queue_sample_negatives(queue_labels, filled, partner_labels, seed, k, self.backend,
                                                     device)

    @staticmethod
    def _check_partners_have_negatives(queue_labels: Tensor, partner_labels: Tensor, filled: int) -> None:
        """A value check (host reads), made before the seed is drawn so a refused call draws nothing: a
        partner has no negative of another class only when every filled row carries its label. Unchecked,
        the sampler gives such a partner a row of -1 indices."""
        scan = backends.host_function("partner_without_negative")  # csrc/python/host.cpp: one pass, no tensors
        bad = scan(queue_labels, filled, partner_labels) if scan is not None else None
        if bad is None:
            lo, hi = (queue_labels if filled == queue_labels.shape[0] else queue_labels[:filled]).aminmax()
            missing = partner_labels == lo
            # two classes queued: every partner has a row of another class
            bad = int(torch.nonzero(missing)[0, 0]) if lo.item() == hi.item() and bool(missing.any()) else -1
        if bad >= 0:
            raise ValueError(f"partner_labels[{bad}] = {int(partner_labels[bad])}: every queued row has "
                             "this label, so no negative of another class exists")

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.values.shape[1]}, labels={self.labels is not None}, "
                f"backend={self.backend!r}")


_PUSH_STRUCTURES: dict = {}


def _check_push(queue: Tensor, queue_labels: Tensor | None, values: Tensor, labels: Tensor | None) -> torch.device:
    """MemoryQueue.push_'s shape, dtype and device checks (the queue's own buffers are right by construction)."""
    check.tensor("values", values, 2)
    if values.shape[1] != queue.shape[1]:
        check.same_size("feature dim", **{"values.shape[1]": values.shape[1], "queue dim": queue.shape[1]})
    if queue_labels is not None:
        if labels is None:
            raise ValueError("labels are required: this queue was built with_labels=True")
        check.tensor("labels", labels, 1, check.INDEX_DTYPES)
        if labels.shape[0] != values.shape[0]:
            check.same_size("batch size", **{"values.shape[0]": values.shape[0],
                                             "labels.shape[0]": labels.shape[0]})
    elif labels is not None:
        raise ValueError("labels given, but this queue has none: build it with with_labels=True")
    device = queue.device
    if values.device != device or (labels is not None and labels.device != device):
        check.same_device(queue=queue, values=values, labels=labels)  # raises, naming each device
    return device
