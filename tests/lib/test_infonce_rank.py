"""infonce_bank_loss's rank output (MoCo's acc@k = rank < k) on the CPU backends, against float64.

The Triton pass is checked the same way in tests/lib/interpreter/interp_infonce.py."""
import functools

import pytest
import torch

from gdrd_fast import reference
from gdrd_fast.ops import infonce
from infonce_cases import SIZES, check_infonce_rank


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b,k,d", SIZES)
def test_chunked_rank_matches_float64(b, k, d, dtype, tied):
    def rows_fn(query, positive, bank, temperature):  # chunks of 64 bank rows: the count spans several
        rows, _, _, rank = infonce.infonce_bank_chunked(query, positive, bank, temperature, False, 64,
                                                        need_rank=True)
        return rows, rank
    check_infonce_rank(rows_fn, b, k, d, dtype, "cpu", tied)


@pytest.mark.parametrize("tied", [False, True])
def test_op_rank_with_gradients(tied):
    """Through the custom op with autograd: the rank rides along, the loss and gradients are unchanged."""
    rows_fn = functools.partial(infonce.infonce_bank_rows, kernel="cpu", return_rank=True)

    def with_grad(query, positive, bank, temperature):
        q = query.clone().requires_grad_(True)
        rows, rank = rows_fn(q, positive, bank, temperature=temperature)
        plain = infonce.infonce_bank_rows(q, positive, bank, temperature=temperature, kernel="cpu")
        assert torch.equal(rows, plain)
        assert torch.equal(*(torch.autograd.grad(r.sum(), q)[0] for r in (rows, plain)))
        return rows, rank
    check_infonce_rank(with_grad, 13, 500, 33, torch.float32, "cpu", tied)


def test_rank_is_strict_and_counts_every_row():
    """A bank of copies of the positive ranks 0; a bank wholly above it ranks K."""
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.5, 0.0]])
    for bank, expected in ((p.repeat(7, 1), 0), (torch.tensor([[1.0, 0.0]]).repeat(7, 1), 7)):
        for rows_fn in (functools.partial(reference.infonce_bank_rows, return_rank=True),
                        functools.partial(infonce.infonce_bank_rows, kernel="cpu", return_rank=True)):
            assert rows_fn(q, p, bank, temperature=0.1)[1].tolist() == [expected]


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,k,d", SIZES + [(256, 65536, 128), (7, 5000, 256)])
def test_triton_rank_on_gpu_matches_float64(b, k, d, dtype, tied):
    """The compiled NEED_RANK pass (MoCo's size included), through the public call under 'auto' (Triton on
    CUDA, the exact path past its widths), with gradients."""
    import gdrd_fast

    def rows_fn(query, positive, bank, temperature):
        q = query.clone().requires_grad_(True)
        rows, rank = gdrd_fast.infonce_bank_loss(q, positive, bank, temperature=temperature, reduction="none",
                                                 backend="auto", return_rank=True)
        rows.sum().backward()
        return rows, rank
    check_infonce_rank(rows_fn, b, k, d, dtype, "cuda", tied)


def test_public_call_refuses_rank_with_pair_options_and_ranks_an_empty_bank_zero():
    import gdrd_fast

    q, p = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(ValueError, match="return_rank needs a plain bank"):
        gdrd_fast.infonce_bank_loss(q, p, torch.randn(5, 6), normalize=True, return_rank=True)
    loss, rank = gdrd_fast.infonce_bank_loss(q, p, torch.zeros(0, 6), return_rank=True)
    assert float(loss) == 0.0 and rank.tolist() == [0, 0, 0, 0]
    bank = torch.randn(9, 6)
    for backend in ("torch", "cpu"):  # the rank rides along: the loss is the one without it
        loss, rank = gdrd_fast.infonce_bank_loss(q, p, bank, backend=backend, return_rank=True)
        assert torch.equal(loss, gdrd_fast.infonce_bank_loss(q, p, bank, backend=backend)) and rank.dtype == torch.int64
