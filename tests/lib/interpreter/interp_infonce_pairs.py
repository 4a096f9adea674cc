"""infonce_bank_loss's in-batch / normalize / label options on the Triton backend (interpreted, CPU
tensors): the bank still goes through the Triton kernel, merged with the dense B x B block."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before gdrd_fast.kernels loads (see interp_infonce.py)

import pytest
import torch

import gdrd_fast
from gdrd_fast.testing import assert_close

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("b,k,d", [(1, 37, 31), (5, 0, 31), (7, 1, 100), (13, 123, 64)])
@pytest.mark.parametrize("labelled", [False, True])
def test_triton_pairs_match_float64(b, k, d, labelled):
    q, p, n = (torch.randn(b, d, requires_grad=True) for _ in range(3))
    bank = torch.randn(k, d)
    kw = {"temperature": 0.1, "batch_negatives": n, "normalize": True}
    if labelled:
        kw.update(labels=torch.randint(3, (b,)), bank_labels=torch.randint(3, (k,)))
    grad_out = torch.rand(b) + 0.5
    got = gdrd_fast.infonce_bank_loss(q, p, bank, reduction="none", backend="triton", **kw)
    gots = torch.autograd.grad(got, (q, p, n), grad_out, allow_unused=True)  # B = 1: no in-batch negative
    q64, p64, n64 = (t.detach().double().requires_grad_() for t in (q, p, n))
    ref = gdrd_fast.infonce_bank_loss(q64, p64, bank.double(), reduction="none", backend="torch",
                                      **{**kw, "batch_negatives": n64})
    refs = torch.autograd.grad(ref, (q64, p64, n64), grad_out.double())
    assert_close("rows", got, ref, None, torch.float32)
    for name, g, r in zip(("query", "positive", "batch_negatives"), gots, refs):
        assert_close(f"grad {name}", torch.zeros_like(r) if g is None else g, r, None, torch.float32)
