"""Memory bank and queue backends; gdrd_fast.functional validates, resolves and calls them.

Compiled kernels in csrc/: torch.ops.gdrd_fast_C bank_update_ and bank_update_pair_ (two banks, one idx,
one launch; cpu/bank_update.cpp, cuda/bank_update.cu), queue_push_ and queue_sample_negatives
(cpu/queue.cpp, cuda/queue.cu); the reference (gdrd_fast.reference) is the 'torch' backend. They write in
place, so they are torch ops with mutation schemas (csrc/ops.cpp) and fake kernels, not autograd ops;
what they write gets its version counter bumped here, as torch's own in-place ops do.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.graph import increment_version

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
    """Backends of one compiled op: 'cpu' and 'cuda' load the same torch.ops entry, dispatched by device."""

    def available(extension_check):
        compiled = backends.with_compiled_op(op, extension_check)

        def unavailable(device: torch.device) -> str | None:
            reason = compiled(device)
            if reason is None:
                _register_fakes()  # here (resolution runs eagerly, once): the schemas exist once the extension loads
            return reason

        return unavailable

    def load():
        return _bumping_versions(op)

    return {"cpu": backends.Backend(load, available(backends.with_cpu_extension)),
            "cuda": backends.Backend(load, available(backends.with_cuda_extension))}


# the arguments each in-place op's schema marks written (a!), by position (tests/lib/test_memory_kernels.py
# checks them against csrc/ops.cpp); read here, not from the schema, so torch.compile can trace the call
WRITTEN = {"bank_update_": (0,), "bank_update_pair_": (0, 2), "queue_push_": (0, 1, 2, 5)}


@functools.cache
def _bumping_versions(op: str):
    """The compiled op, then a version bump of every argument it wrote: a backward that saved a tensor the
    kernel has since overwritten then fails loudly instead of using the new values. Built once per op (a
    push is a few microseconds of work), calling the overload itself rather than the packet's dispatch."""
    kernel = getattr(torch.ops.gdrd_fast_C, op).default
    written = WRITTEN.get(op)
    if written is None:
        return kernel

    def call(*args):
        result = kernel(*args)
        increment_version([args[i] for i in written if args[i] is not None])
        return result

    return call


def _reference_pair(memory_a, values_a, memory_b, values_b, idx, momentum):
    reference.bank_update_(memory_a, idx, values_a, momentum)
    reference.bank_update_(memory_b, idx, values_b, momentum)


# backend -> (memory, idx, values, momentum) -> None, in place
IMPLS = backends.Op("bank_update_", {
    "torch": backends.Backend(lambda: reference.bank_update_, backends.anywhere), **_compiled("bank_update_")})
# backend -> (memory_a, values_a, memory_b, values_b, idx, momentum) -> None: two banks, one idx (CRD)
PAIR_IMPLS = backends.Op("bank_update_pair_", {
    "torch": backends.Backend(lambda: _reference_pair, backends.anywhere), **_compiled("bank_update_pair_")})


# backend -> (queue, ptr, count, values, labels, queue_labels) -> None, in place
PUSH_IMPLS = backends.Op("queue_push_", {
    "torch": backends.Backend(lambda: reference.queue_push_, backends.anywhere), **_compiled("queue_push_")})
# backend -> (queue_labels, filled, partner_labels, seed, k) -> [B, k] int64
SAMPLE_IMPLS = backends.Op("queue_sample_negatives", {
    "torch": backends.Backend(lambda: reference.queue_sample_negatives, backends.anywhere),
    **_compiled("queue_sample_negatives")})
