"""infonce_bank_loss fast paths against the float64 reference: the chunked CPU path here, the Triton
kernels on a GPU (marked cuda; the same kernels run on CPU in tests/lib/interpreter/interp_infonce.py)."""
import pytest
import torch

from infonce_cases import SIZES, check_infonce


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,k,d", SIZES)
def test_cpu_backend_matches_float64(b, k, d, dtype):
    check_infonce("cpu", b, k, d, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,k,d", SIZES + [(256, 65536, 128), (300, 20000, 512), (7, 5000, 256)])
def test_triton_backend_on_gpu_matches_float64(b, k, d, dtype):
    check_infonce("auto", b, k, d, dtype, "cuda")


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_cpu_backend_online_rescale_across_many_chunks(chunk):
    """Small chunks force the running max to move many times: the rescaled sums must stay exact."""
    from gdrd_fast import reference
    from gdrd_fast.ops.infonce import infonce_bank_chunked
    q, p = torch.randn(5, 9, dtype=torch.float64) * 3, torch.randn(5, 9, dtype=torch.float64)
    bank = torch.randn(123, 9, dtype=torch.float64) * 3
    rows, grad_q, grad_p, _ = infonce_bank_chunked(q, p, bank, 0.1, True, chunk)
    qr, pr = q.clone().requires_grad_(), p.clone().requires_grad_()
    expected = reference.infonce_bank_loss(qr, pr, bank, temperature=0.1, reduction="none")
    torch.testing.assert_close(rows, expected.detach(), rtol=1e-12, atol=1e-12)
    for i in range(5):
        gq, gp = torch.autograd.grad(expected[i], (qr, pr), retain_graph=True)
        torch.testing.assert_close(grad_q[i], gq[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad_p[i], gp[i], rtol=1e-10, atol=1e-12)
