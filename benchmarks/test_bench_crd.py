"""CRD loss step on both banks (fwd + bwd of both sides, then the momentum update of both banks).

Providers: RepDistiller-style eager (index_select + bmm), the gather-mul-sum spelling, torch.compile of
both, torchdistill's CRDLoss (installed peer), gdrd_fast.CRDLoss on each compiled backend (which picks
the dense path by itself when B(K+1) >= 2N), and the compiled gathered pair kernel called directly
("<backend>-gathered", to time the gathered kernel at sizes where CRDLoss would go dense).
Ratios against "eager" print after the run (benchmarks/conftest.py).
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from gdrd_fast import CRDLoss
from gdrd_fast.ops import crd_nce
from gdrd_fast import functional
from .harness import cases, measure, skip_unavailable

OP = "crd_nce_loss (both banks, + bank update)"
SIZES = {  # (B, K, D, N)
    "cpu": {"B64-K16384-D128-N50000": (64, 16384, 128, 50000)},
    "cuda": {f"B{b}-K{k}-D{d}-N{n}": (b, k, d, n) for b, k, d, n in
             [(64, 16384, 128, 1281167), (256, 16384, 128, 1281167), (64, 16384, 128, 50000)]},
}
TEMPERATURE, MOMENTUM, EPS = 0.07, 0.5, 1e-7


def gathered_bytes(size_key: str, device: str) -> int:
    """What one step must read at least: row idx[b, k] of both fp32 banks once, and idx (int64) once."""
    b, k, d, _ = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    return b * (k + 1) * (2 * d * 4 + 8)


def repdistiller_scores(bank, v, idx):
    b, cols = idx.shape
    return torch.bmm(torch.index_select(bank, 0, idx.view(-1)).view(b, cols, -1), v.view(b, -1, 1)).squeeze(2)


def gather_scores(bank, v, idx):
    return (bank[idx] * v[:, None, :]).sum(-1)


def nce_loss(out, n_data):
    """RepDistiller's NCECriterion on out = exp(s / T) / Z."""
    k = out.shape[1] - 1
    noise = k / n_data
    log_d1 = torch.log(out[:, 0] / (out[:, 0] + noise + EPS))
    log_d0 = torch.log(noise / (out[:, 1:] + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / out.shape[0]


def eager_loss(scores, bank_s, bank_t, v_s, v_t, idx, z_s, z_t, n_data):
    out_s = torch.exp(scores(bank_t.detach(), v_s, idx) / TEMPERATURE) / z_s
    out_t = torch.exp(scores(bank_s.detach(), v_t, idx) / TEMPERATURE) / z_t
    return nce_loss(out_s, n_data) + nce_loss(out_t, n_data)


def eager_update(bank, pos, v):
    with torch.no_grad():
        rows = torch.index_select(bank, 0, pos).mul_(MOMENTUM).add_(v.detach() * (1 - MOMENTUM))
        bank.index_copy_(0, pos, F.normalize(rows, dim=1))


def build(provider: str, size_key: str, device: str):
    b, k, d, n = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    gen = torch.Generator(device=device).manual_seed(0)
    v_s = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).requires_grad_(True)
    v_t = F.normalize(torch.randn(b, d, device=device, generator=gen), dim=1).requires_grad_(True)
    pos = torch.randperm(n, device=device, generator=gen)[:b]
    idx = torch.cat([pos[:, None], torch.randint(n, (b, k), device=device, generator=gen)], 1)
    bank_s = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    bank_t = F.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    z = 2.0 * n  # about n * mean(exp(s / T)) for random unit vectors at D=128, T=0.07
    log_z = torch.tensor(math.log(z), dtype=torch.float64, device=device)

    if provider in ("eager", "gather", "compile-eager", "compile-gather"):
        scores = gather_scores if provider.endswith("gather") else repdistiller_scores
        loss_fn = torch.compile(eager_loss) if provider.startswith("compile") else eager_loss

        def step():
            v_s.grad = v_t.grad = None
            loss_fn(scores, bank_s, bank_t, v_s, v_t, idx, z, z, n).backward()
            eager_update(bank_s, pos, v_s)
            eager_update(bank_t, pos, v_t)
    elif provider == "torchdistill":
        from torchdistill.losses.mid_level import CRDLoss as TorchdistillCRD
        crd = TorchdistillCRD("norm", "empty", "norm", d, n, k, n, TEMPERATURE, MOMENTUM, EPS).to(device)
        crd.memory_v1.copy_(bank_s)
        crd.memory_v2.copy_(bank_t)
        crd.params[2] = crd.params[3] = z
        crd.probs, crd.alias = crd.probs.to(device), crd.alias.to(device)

        def step():
            v_s.grad = v_t.grad = None
            student = {"norm": {"output": v_s}, "empty": {"input": {"pos_idx": pos, "contrast_idx": idx}}}
            crd(student, {"norm": {"output": v_t}}).backward()
    elif provider.endswith("-gathered"):
        backend = provider.removesuffix("-gathered")
        reason = crd_nce.PAIR_IMPLS[backend].unavailable(torch.device(device))  # also loads the extension
        if reason:
            raise RuntimeError(reason)
        kernel = crd_nce.PAIR_KERNELS[backend]()

        def step():  # what crd_nce_pair_op runs when the dense path does not win, and its backward
            rows_s, g_s, rows_t, g_t = kernel(v_s.detach(), bank_t, log_z, v_t.detach(), bank_s, log_z, idx,
                                              1 / TEMPERATURE, k / n, EPS, True)
            v_s.grad, v_t.grad = g_s / b, g_t / b  # the "mean" reduction's backward
            functional.bank_update_pair_(bank_s, v_s.detach(), bank_t, v_t.detach(), pos, MOMENTUM, backend)
    else:  # gdrd_fast.CRDLoss on one backend, embeddings given (identity heads)
        crd = CRDLoss(d, d, n, feat_dim=d, nce_k=k, nce_t=TEMPERATURE, nce_m=MOMENTUM, backend=provider).to(device)
        crd.embed_s = crd.embed_t = torch.nn.Identity()
        crd.memory_s.rows.copy_(bank_s)
        crd.memory_t.rows.copy_(bank_t)
        crd.log_z_s.fill_(log_z.item())
        crd.log_z_t.fill_(log_z.item())

        def step():
            v_s.grad = v_t.grad = None
            crd(v_s, v_t, pos, idx).backward()
    return step


def _providers(device: str) -> list[str]:
    names = ["eager", "gather", "compile-eager", "compile-gather"]
    if importlib.util.find_spec("torchdistill") is not None:
        names.append("torchdistill")
    backend = "cuda" if device == "cuda" else "cpu"
    return names + [backend, f"{backend}-gathered"]


@pytest.mark.parametrize("provider,size_key,device", cases(SIZES, _providers))
def test_crd(benchmark, provider, size_key, device):
    skip_unavailable(crd_nce.PAIR_IMPLS, provider.removesuffix("-gathered"), device)
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=3 if device == "cpu" else 50,
            bytes=gathered_bytes(size_key, device))
