"""Momentum update of CRD's two banks: RepDistiller-style eager (~9 kernels per bank), its torch.compile,
the float64-capable reference, and gdrd_fast's fused two-bank kernel (one launch on GPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gdrd_fast import reference
from gdrd_fast import functional
from gdrd_fast.ops import memory as memory_ops
from .harness import cases, measure, skip_unavailable

OP = "bank update (both banks)"
SIZES = {  # (B, D, N)
    "cpu": {"B64-D128-N50000": (64, 128, 50000), "B256-D128-N50000": (256, 128, 50000)},
    "cuda": {f"B{b}-D{d}-N{n}": (b, d, n) for b, d, n in [(64, 128, 1281167), (256, 128, 1281167)]},
}
MOMENTUM = 0.5


def eager_update(bank, pos, v):
    """RepDistiller's ContrastMemory update of one bank."""
    rows = torch.index_select(bank, 0, pos.view(-1))
    rows.mul_(MOMENTUM)
    rows.add_(torch.mul(v, 1 - MOMENTUM))
    norm = rows.pow(2).sum(1, keepdim=True).pow(0.5)
    bank.index_copy_(0, pos, rows.div(norm))


def eager_both(bank_s, bank_t, pos, v_s, v_t):
    eager_update(bank_s, pos, v_s)
    eager_update(bank_t, pos, v_t)


def build(provider: str, size_key: str, device: str):
    b, d, n = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    gen = torch.Generator(device=device).manual_seed(0)
    bank_s = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    bank_t = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    pos = torch.randperm(n, device=device, generator=gen)[:b]
    v_s = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1)
    v_t = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1)
    if provider == "eager":
        return lambda: eager_both(bank_s, bank_t, pos, v_s, v_t)
    if provider == "compile":
        compiled = torch.compile(eager_both)
        return lambda: compiled(bank_s, bank_t, pos, v_s, v_t)
    if provider == "reference":
        return lambda: (reference.bank_update_(bank_s, pos, v_s, MOMENTUM),
                        reference.bank_update_(bank_t, pos, v_t, MOMENTUM))
    return lambda: functional.bank_update_pair_(bank_s, v_s, bank_t, v_t, pos, MOMENTUM, provider)


def _providers(device: str) -> list[str]:
    return ["eager", "compile", "reference", "cuda" if device == "cuda" else "cpu"]


@pytest.mark.parametrize("provider,size_key,device", cases(SIZES, _providers))
def test_bank_update(benchmark, provider, size_key, device):
    skip_unavailable(memory_ops.PAIR_IMPLS, provider, device)
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=200)
