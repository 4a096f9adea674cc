"""infonce_bank_loss fast paths against the float64 reference: the chunked CPU path here, the Triton
kernels on a GPU (marked cuda; the same kernels run on CPU in tests/interpreter/interp_infonce.py)."""
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
    check_infonce("triton", b, k, d, dtype, "cuda")
