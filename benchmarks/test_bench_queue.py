"""MemoryQueue ops. Push: MoCo's _dequeue_and_enqueue (slice assignment at a host-side pointer, read
with a sync), the reference scatter, and gdrd_fast's kernel (pointer on the device, no sync).
Sampling "other class" negatives: torch.multinomial over a B x N mask (the usual spelling), the
reference (stable sort + searchsorted), and gdrd_fast's kernel."""
from __future__ import annotations

import pytest
import torch

from gdrd_fast import reference
from gdrd_fast import functional
from gdrd_fast.ops import memory as memory_ops
from .harness import cases, measure, skip_unavailable

# (op, B, D, queue size, k negatives, classes); CRRCD's defaults and a MoCo-sized queue
SIZES = {
    "cpu": {"push-B256-D512-Q16384": ("push", 256, 512, 16384, 0, 0),
            "sample-B256-Q16384-k512-C1000": ("sample", 256, 0, 16384, 512, 1000)},
    "cuda": {"push-B256-D512-Q16384": ("push", 256, 512, 16384, 0, 0),
             "push-B256-D128-Q65536": ("push", 256, 128, 65536, 0, 0),
             "sample-B256-Q16384-k512-C1000": ("sample", 256, 0, 16384, 512, 1000),
             "sample-B1024-Q65536-k4096-C10000": ("sample", 1024, 0, 65536, 4096, 10000)},
}
OPS = {"push": "queue push (values + labels)", "sample": "negative sampling (other class)"}


def moco_enqueue(queue, queue_labels, queue_ptr, keys, labels):
    """MoCo's _dequeue_and_enqueue, with the label queue a supervised variant keeps alongside."""
    ptr = int(queue_ptr)
    queue[ptr:ptr + keys.shape[0]] = keys
    queue_labels[ptr:ptr + keys.shape[0]] = labels
    queue_ptr[0] = (ptr + keys.shape[0]) % queue.shape[0]


def multinomial_negatives(queue_labels, partner, k):
    return torch.multinomial((queue_labels[None, :] != partner[:, None]).float(), k, replacement=True)


def build(provider: str, size_key: str, device: str):
    op, b, d, size, k, classes = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    gen = torch.Generator(device=device).manual_seed(0)
    queue_labels = torch.randint(classes or 1000, (size,), device=device, generator=gen)
    if op == "push":
        queue = torch.randn(size, d, device=device, generator=gen)
        ptr, count = torch.zeros(1, dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
        keys = torch.randn(b, d, device=device, generator=gen)
        labels = torch.randint(1000, (b,), device=device, generator=gen)
        if provider == "eager":
            return lambda: moco_enqueue(queue, queue_labels, ptr, keys, labels)
        if provider == "reference":
            return lambda: reference.queue_push_(queue, ptr[0], count, keys, labels, queue_labels)
        return lambda: functional.queue_push_(queue, ptr, count, keys, labels, queue_labels, provider)
    partner = torch.randint(classes, (b,), device=device, generator=gen)
    seed = torch.tensor([1234], device=device)
    if provider == "eager":
        return lambda: multinomial_negatives(queue_labels, partner, k)
    if provider == "reference":
        return lambda: reference.queue_sample_negatives(queue_labels, size, partner, seed, k)
    return lambda: functional.queue_sample_negatives(queue_labels, size, partner, seed, k, provider)


def _providers(device: str) -> list[str]:
    return ["eager", "reference", "cuda" if device == "cuda" else "cpu"]


@pytest.mark.parametrize("provider,size_key,device", cases(SIZES, _providers))
def test_queue(benchmark, provider, size_key, device):
    op = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key][0]
    skip_unavailable(memory_ops.PUSH_IMPLS if op == "push" else memory_ops.SAMPLE_IMPLS, provider, device)
    measure(benchmark, __name__, OPS[op], provider, size_key, device, rounds=100)
