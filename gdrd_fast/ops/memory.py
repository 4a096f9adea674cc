"""Memory bank and queue dispatch (ops.md section 5); compiled kernels in csrc/: torch.ops.gdrd_fast_C
bank_update_ and bank_update_pair_ (two banks, one idx, one launch; cpu/bank_update.cpp, cuda/bank_update.cu),
queue_push_ and queue_sample_negatives (cpu/queue.cpp, cuda/queue.cu). Callers validate: these write in place.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import backends, reference


@functools.cache
def _register_fakes() -> None:
    """Shapes for FakeTensor (torch.compile, opcheck): three ops write in place, the sampler returns [B, k].
    Ops an older build lacks are skipped (their backends report themselves unavailable)."""
    def sample_shape(queue_labels, filled, partner_labels, seed, k):
        return partner_labels.new_empty((partner_labels.shape[0], k), dtype=torch.long)

    fakes = {"bank_update_": lambda *args: None, "bank_update_pair_": lambda *args: None,
             "queue_push_": lambda *args: None, "queue_sample_negatives": sample_shape}
    for op, fake in fakes.items():
        if hasattr(torch.ops.gdrd_fast_C, op):
            torch.library.register_fake(f"gdrd_fast_C::{op}", fake)


def _compiled(op: str):
    """IMPLS of one compiled op: 'cpu' and 'cuda' load the same torch.ops entry, dispatched by device."""

    def load():
        _register_fakes()  # here: the schemas exist only once the extension is imported
        return getattr(torch.ops.gdrd_fast_C, op)

    return {"cpu": backends.Impl(load, backends.with_compiled_op(op, backends.with_cpu_extension)),
            "cuda": backends.Impl(load, backends.with_compiled_op(op, backends.with_cuda_extension))}


# backend name -> Impl whose function is (memory, idx, values, momentum) -> None, in place
IMPLS = _compiled("bank_update_")
# backend name -> Impl whose function is (memory_a, values_a, memory_b, values_b, idx, momentum) -> None
PAIR_IMPLS = _compiled("bank_update_pair_")


def bank_update_(memory: Tensor, idx: Tensor, values: Tensor, momentum: float, backend: str = "auto") -> None:
    name = backends.resolve("MemoryBank.update_", IMPLS, backend, memory.device)
    if name == "torch":
        reference.bank_update_(memory, idx, values, momentum)
    else:
        IMPLS[name].load()(memory, idx, values.detach(), momentum)


def bank_update_pair_(memory_a: Tensor, values_a: Tensor, memory_b: Tensor, values_b: Tensor, idx: Tensor,
                      momentum: float, backend: str = "auto") -> None:
    """bank_update_ of two banks that share idx (CRD's student and teacher banks)."""
    name = backends.resolve("bank_update_pair_", PAIR_IMPLS, backend, memory_a.device)
    if name == "torch":
        reference.bank_update_(memory_a, idx, values_a, momentum)
        reference.bank_update_(memory_b, idx, values_b, momentum)
    else:
        PAIR_IMPLS[name].load()(memory_a, values_a.detach(), memory_b, values_b.detach(), idx, momentum)


# backend name -> Impl whose function is (queue, ptr, count, values, labels, queue_labels) -> None, in place
PUSH_IMPLS = _compiled("queue_push_")
# backend name -> Impl whose function is (queue_labels, filled, partner_labels, seed, k) -> [B, k] int64
SAMPLE_IMPLS = _compiled("queue_sample_negatives")


def queue_push_(queue: Tensor, ptr: Tensor, count: Tensor, values: Tensor, labels: Tensor | None,
                queue_labels: Tensor | None, backend: str = "auto") -> None:
    name = backends.resolve("MemoryQueue.push_", PUSH_IMPLS, backend, queue.device)
    push = reference.queue_push_ if name == "torch" else PUSH_IMPLS[name].load()
    push(queue, ptr, count, values.detach(), labels, queue_labels)


def queue_sample_negatives(queue_labels: Tensor | None, filled: int, partner_labels: Tensor, seed: Tensor, k: int,
                           backend: str = "auto") -> Tensor:
    name = backends.resolve("MemoryQueue.sample_negatives", SAMPLE_IMPLS, backend, partner_labels.device)
    sample = reference.queue_sample_negatives if name == "torch" else SAMPLE_IMPLS[name].load()
    return sample(queue_labels, filled, partner_labels, seed, k)
