"""infonce_bank_loss cases shared by the CPU tests, the Triton-interpreter tests and the GPU tests."""
from __future__ import annotations

import functools

import torch

import gdrd_fast
from gdrd_fast import reference
from loss_checks import check_loss_and_grads

# odd sizes from docs/design/testing.md: (B, K, D); K=1000 spans several bank splits with a ragged last tile
SIZES = [(1, 1, 31), (47, 123, 100), (5, 1000, 128), (3, 77, 512)]
# the dtypes every fast path is checked in (float64 is the reference's)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_infonce(backend: str, b: int, k: int, d: int, dtype: torch.dtype, device: str) -> None:
    temperature = float(torch.empty(()).uniform_(0.05, 0.5))

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)

    inputs = {"query": unit(b), "positive": unit(b), "bank": unit(k)}
    fast = functools.partial(gdrd_fast.infonce_bank_loss, temperature=temperature, reduction="none", backend=backend)
    ref = functools.partial(reference.infonce_bank_loss, temperature=temperature, reduction="none")
    check_loss_and_grads(fast, ref, inputs, ("query", "positive"), dtype)
