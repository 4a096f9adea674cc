"""The Triton infonce_bank kernels under TRITON_INTERPRET=1 on CPU tensors, against float64."""
import os

# Triton decides at import whether kernels are interpreted: set before gdrd_fast.kernels loads. These
# files are run by tests/lib/test_triton_interpreter.py in their own process (the name keeps `pytest tests`
# from collecting them into a session that compiles kernels for the static checks).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from infonce_cases import DTYPES, SIZES, check_infonce, check_infonce_rank
from op_registry import triton_or_auto

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,k,d", SIZES)
def test_triton_infonce_matches_float64(b, k, d, dtype):
    check_infonce(triton_or_auto("infonce_bank_loss", dtype, d=d), b, k, d, dtype, "cpu")


def test_every_bank_split_counts():
    """Many splits, ragged tiles, more splits than query tiles: the merge must weigh every split."""
    from gdrd_fast import backends, reference
    from gdrd_fast.testing import assert_close
    infonce = backends.kernels().infonce
    q, p, bank = torch.randn(9, 40), torch.randn(9, 40), torch.randn(301, 40)
    rows, grad_q, grad_p, _ = infonce.infonce_bank_forward(q, p, bank, 0.3, True, programs=64,
                                                        tiles=infonce.Tiles(64, 16, 16, 4, 1))
    q64 = q.double().requires_grad_(True)
    p64 = p.double().requires_grad_(True)
    ref_rows = reference.infonce_bank_loss(q64, p64, bank.double(), temperature=0.3, reduction="none")
    ref_gq, ref_gp = torch.autograd.grad(ref_rows.sum(), (q64, p64))
    assert_close("rows", rows, ref_rows, None, torch.float32)
    assert_close("grad query", grad_q, ref_gq, None, torch.float32)
    assert_close("grad positive", grad_p, ref_gp, None, torch.float32)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,k,d", SIZES)
def test_triton_rank_matches_float64(b, k, d, dtype, tied):
    """rank from the Triton pass (several splits at K=1000) against the reference's count, through the
    public call (inputs the kernel refuses take the exact chunked path under 'auto')."""
    import gdrd_fast

    def rows_fn(query, positive, bank, temperature):
        return gdrd_fast.infonce_bank_loss(query, positive, bank, temperature=temperature, reduction="none",
                                           backend=backend, return_rank=True)
    backend = triton_or_auto("infonce_bank_loss", dtype, d=d)
    check_infonce_rank(rows_fn, b, k, d, dtype, "cpu", tied)


def test_rank_sums_every_split():
    """Many splits and ragged tiles, with and without gradients: each split's count must be added once."""
    from gdrd_fast import backends, reference
    infonce = backends.kernels().infonce
    q, p, bank = (torch.randint(-1, 2, (n, 40)).float() for n in (9, 9, 301))
    bank[:9] = p
    ref_rank = reference.infonce_bank_rows(q.double(), p.double(), bank.double(), temperature=0.3,
                                           return_rank=True)[1]
    for need_grad in (True, False):
        rank = infonce.infonce_bank_forward(q, p, bank, 0.3, need_grad, True, programs=64,
                                            tiles=infonce.Tiles(64, 16, 16, 4, 1))[3]
        assert torch.equal(rank, ref_rank)
