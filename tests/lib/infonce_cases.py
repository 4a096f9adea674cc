"""infonce_bank_loss cases shared by the CPU tests, the Triton-interpreter tests and the GPU tests."""
from __future__ import annotations

import functools

import torch

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.testing import assert_close
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


def check_infonce_pairs(backend: str, b: int, k: int, d: int, labelled: bool, device: str, temperature: float,
                        classes: int) -> None:
    """In-batch negatives + normalize (+ labels): loss rows and every gradient, fp32 against float64."""
    q, p, n = (torch.randn(b, d, device=device, requires_grad=True) for _ in range(3))
    bank = torch.randn(k, d, device=device)
    kw = {"temperature": temperature, "batch_negatives": n, "normalize": True}
    if labelled:
        kw.update(labels=torch.randint(classes, (b,), device=device),
                  bank_labels=torch.randint(classes, (k,), device=device))
    grad_out = torch.rand(b, device=device) + 0.5
    got = gdrd_fast.infonce_bank_loss(q, p, bank, reduction="none", backend=backend, **kw)
    gots = torch.autograd.grad(got, (q, p, n), grad_out, allow_unused=True)  # B = 1: no in-batch negative
    q64, p64, n64 = (t.detach().double().requires_grad_() for t in (q, p, n))
    ref = gdrd_fast.infonce_bank_loss(q64, p64, bank.double(), reduction="none", backend="torch",
                                      **{**kw, "batch_negatives": n64})
    refs = torch.autograd.grad(ref, (q64, p64, n64), grad_out.double())
    assert_close("rows", got, ref, None, torch.float32)
    for name, g, r in zip(("query", "positive", "batch_negatives"), gots, refs):
        assert_close(f"grad {name}", torch.zeros_like(r) if g is None else g, r, None, torch.float32)


def _rank_inputs(b: int, k: int, d: int, dtype: torch.dtype, device: str, tied: bool):
    """Unit rows, or (tied) rows of -1/0/1 whose scores are small integers, exact in every dtype and
    accumulation order, so that many bank rows tie with the positive exactly."""
    def rows(n):
        if tied:
            return torch.randint(-1, 2, (n, d), device=device).to(dtype)
        return torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)
    query, positive, bank = rows(b), rows(b), rows(k)
    if tied:  # some bank rows are copies of a positive: a tie that must not count
        bank[:min(b, k)] = positive[:min(b, k)]
    return query, positive, bank


def check_infonce_rank(rows_fn, b: int, k: int, d: int, dtype: torch.dtype, device: str, tied: bool) -> None:
    """rows_fn(query, positive, bank, temperature) -> (rows, rank) against the float64 reference's rank.

    Tied inputs must give the reference's count exactly (ties excluded). Random unit inputs may round a
    near-tie either way: every bank row further than 1e-4 / T from the positive's logit must be counted
    as the reference counts it, and the rank may differ only by the rows within that margin."""
    temperature = float(torch.empty(()).uniform_(0.05, 0.5))
    query, positive, bank = _rank_inputs(b, k, d, dtype, device, tied)
    rows, rank = rows_fn(query, positive, bank, temperature)
    ref_rows, ref_rank = reference.infonce_bank_rows(query.double(), positive.double(), bank.double(),
                                                     temperature=temperature, return_rank=True)
    assert rank.dtype == torch.int64 and rank.shape == (b,)
    if tied:
        assert torch.equal(rank.cpu(), ref_rank.cpu()), (rank, ref_rank)
        return
    margin = (query.double() @ bank.double().t() - (query.double() * positive.double()).sum(1, keepdim=True))
    near = (margin.abs() < 1e-4).sum(1)
    assert ((rank - ref_rank).abs() <= near).all(), (rank, ref_rank, near)
    assert_close("rows", rows, ref_rows, None, dtype)
