"""Memory-bank update dispatch (ops.md section 5); compiled kernels in csrc/ (cpu/bank_update.cpp,
cuda/bank_update.cu): torch.ops.gdrd_fast_C.bank_update_ and bank_update_pair_ (two banks, one idx, one launch).
Callers validate: these write in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference


def _single():
    return torch.ops.gdrd_fast_C.bank_update_


def _pair():
    return torch.ops.gdrd_fast_C.bank_update_pair_


# backend name -> Impl whose function is (memory, idx, values, momentum) -> None, in place
IMPLS: dict[str, backends.Impl] = {
    "cpu": backends.Impl(_single, backends.with_compiled_op("bank_update_", backends.with_cpu_extension)),
    "cuda": backends.Impl(_single, backends.with_compiled_op("bank_update_", backends.with_cuda_extension)),
}
# backend name -> Impl whose function is (memory_a, values_a, memory_b, values_b, idx, momentum) -> None
PAIR_IMPLS: dict[str, backends.Impl] = {
    "cpu": backends.Impl(_pair, backends.with_compiled_op("bank_update_pair_", backends.with_cpu_extension)),
    "cuda": backends.Impl(_pair, backends.with_compiled_op("bank_update_pair_", backends.with_cuda_extension)),
}


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
