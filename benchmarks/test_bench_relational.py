"""relational_contrastive_loss (CRRCD) fwd+bwd: eager reference, torch.compile(reference) and gdrd_fast
backends. GPU size = the paper's: B=96, K=512 negatives, d=128, 512-d embeddings, queue 16384."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import relational as relational_ops
from .harness import cases, measure, random_relational_params, skip_unavailable

OP = "relational_contrastive_loss"
# (batch B, negatives K, relation dim d, embedding dim D, queue length Q)
SIZES = {
    "cpu": {"B16-K64-d128-D512": (16, 64, 128, 512, 4096), "B32-K128-d128-D512": (32, 128, 128, 512, 4096)},
    "cuda": {"B96-K512-d128-D512": (96, 512, 128, 512, 16384), "B64-K512-d128-D512": (64, 512, 128, 512, 16384)},
}
PROVIDERS = ["eager", "compile", "cpu", "triton"]
TEMPERATURE, N_DATA = 0.1, 100_000


def flops(size_key: str, device: str) -> float:
    """Forward FLOP of the key relations, both sides: 2 * R(K+1) * d^2 per side (docs/performance/index.md)."""
    b, k, d, _, _ = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    return 2 * 2 * b * (b - 1) * (k + 1) * d * d


def build(provider: str, size_key: str, device: str):
    b, k, d, embed, queue = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, device=device, generator=gen), dim=-1).to(dtype)

    params = random_relational_params(embed, d, device, gen)  # float32, as under autocast
    e_t, e_s = unit(b, embed), unit(b, embed).requires_grad_(True)
    queue_t, queue_s = unit(queue, embed), unit(queue, embed)
    neg_idx = torch.randint(queue, (b, k), device=device, generator=gen)
    log_z = torch.tensor(math.log(N_DATA) + 1.0, device=device)  # any finite frozen value: cost is the same
    if provider == "eager":
        loss_fn = reference.relational_contrastive_loss
    elif provider == "compile":
        loss_fn = torch.compile(reference.relational_contrastive_loss)
    else:
        def loss_fn(*args, **kw):
            return gdrd_fast.relational_contrastive_loss(*args, **kw, backend=provider)

    leaves = [e_s, *params]

    def step():
        for t in leaves:
            t.grad = None
        loss_fn(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature=TEMPERATURE, log_z_t=log_z,
                log_z_s=log_z, n_data=N_DATA).backward()

    return step


@pytest.mark.parametrize("provider,size_key,device", cases(SIZES, PROVIDERS))
def test_relational_contrastive_loss(benchmark, provider, size_key, device):
    skip_unavailable(relational_ops.IMPLS, provider, device)
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=5 if device == "cpu" else 50,
            forward_flop=flops(size_key, device))
