"""infonce_bank_loss fwd+bwd: eager reference, torch.compile(reference) and gdrd_fast backends."""
from __future__ import annotations

import pytest
import torch

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import infonce as infonce_ops
from benchmarks.harness import measure

OP = "infonce_bank_loss"
SIZES = {
    "cpu": {"B256-K65536-D128": (256, 65536, 128), "B64-K16384-D128": (64, 16384, 128)},
    "cuda": {f"B{b}-K{k}-D{d}": (b, k, d) for b, k, d in
             [(256, 16384, 128), (256, 65536, 128), (1024, 65536, 128), (256, 1 << 20, 128), (1024, 65536, 512)]},
}
PROVIDERS = ["eager", "compile", "cpu", "triton"]


def build(provider: str, size_key: str, device: str):
    b, k, d = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)
    positive = torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).to(dtype)
    bank = torch.nn.functional.normalize(torch.randn(k, d, device=device, generator=gen), dim=1).to(dtype)
    query.requires_grad_(True)
    if provider == "eager":
        loss_fn = reference.infonce_bank_loss
    elif provider == "compile":
        loss_fn = torch.compile(reference.infonce_bank_loss)
    else:
        loss_fn = lambda q, p, k_, temperature: gdrd_fast.infonce_bank_loss(q, p, k_, temperature=temperature,
                                                                          backend=provider)

    def step():
        query.grad = None
        loss_fn(query, positive, bank, temperature=0.07).backward()

    return step


def _cases():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for size_key in SIZES[device]:
        for provider in PROVIDERS:
            yield pytest.param(provider, size_key, device, id=f"{size_key}-{provider}")


@pytest.mark.parametrize("provider,size_key,device", list(_cases()))
def test_infonce_bank_loss(benchmark, provider, size_key, device):
    if provider in infonce_ops.IMPLS:
        reason = infonce_ops.IMPLS[provider].unavailable(torch.device(device))
        if reason:
            pytest.skip(reason)
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=5 if device == "cpu" else 50)
