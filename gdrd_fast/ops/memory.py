"""Memory-bank update dispatch (ops.md section 5); compiled kernels in csrc/ (bank_update)."""
from __future__ import annotations

from torch import Tensor

from .. import backends, reference

# backend name -> Impl whose function is (memory, idx, values, momentum) -> None, in place
IMPLS: dict[str, backends.Impl] = {}


def bank_update_(memory: Tensor, idx: Tensor, values: Tensor, momentum: float, backend: str = "auto") -> None:
    name = backends.resolve("MemoryBank.update_", IMPLS, backend, memory.device)
    if name == "torch":
        reference.bank_update_(memory, idx, values, momentum)
    else:
        IMPLS[name].load()(memory, idx, values.detach(), momentum)
