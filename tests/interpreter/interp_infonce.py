"""The Triton infonce_bank kernels under TRITON_INTERPRET=1 on CPU tensors, against float64."""
import pytest
import torch

from infonce_cases import SIZES, check_infonce

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,k,d", SIZES)
def test_triton_infonce_matches_float64(b, k, d, dtype):
    check_infonce("triton", b, k, d, dtype, "cpu")


def test_every_bank_split_counts():
    """Many splits, ragged tiles, more splits than query tiles: the merge must weigh every split."""
    from gdrd_fast import backends, reference
    forward = backends.kernels().infonce.infonce_bank_forward
    q, p, bank = torch.randn(9, 40), torch.randn(9, 40), torch.randn(301, 40)
    rows, grad_q, grad_p = forward(q, p, bank, 0.3, True, programs=64,
                                   config={"BLOCK_D": 64, "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1})
    q64 = q.double().requires_grad_(True)
    p64 = p.double().requires_grad_(True)
    ref_rows = reference.infonce_bank_loss(q64, p64, bank.double(), temperature=0.3, reduction="none")
    ref_gq, ref_gp = torch.autograd.grad(ref_rows.sum(), (q64, p64))
    torch.testing.assert_close(rows.double(), ref_rows.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_q.double(), ref_gq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_p.double(), ref_gp, rtol=1e-5, atol=1e-5)
