"""The compiled CRD kernels (csrc/cpu/crd_nce.cpp; csrc/cuda/crd_nce.cu on a GPU) and the dense path
against the float64 reference: loss and anchor gradient, grad_output != 1, no-grad forward."""
import math

import pytest
import torch

from gdrd_fast import backends, functional, reference
from gdrd_fast.ops import crd_nce
from gdrd_fast.testing import assert_close

from crd_cases import DTYPES, SIZES, check_crd, crd_inputs

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="needs the C++ extension gdrd_fast._C")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_crd_nce_loss_matches_float64_reference(device, size, dtypes, idx_dtype):
    check_crd("cpu" if device == "cpu" else "cuda", size, dtypes, idx_dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
def test_pair_kernel_equals_two_single_kernels(device, size):
    """One idx read for both sides gives what two single-bank kernels give."""
    anchor_a, memory_a, idx, log_z_a = crd_inputs(*size, torch.float32, torch.float32, torch.int64, device)
    anchor_b, memory_b, _, log_z_b = crd_inputs(*size, torch.float32, torch.float32, torch.int64, device)
    if not crd_nce.dense_wins(idx, memory_a):
        backend = crd_nce.PAIR_IMPLS[device].kernel()
        single = crd_nce.IMPLS[device].kernel()
        c, inv_t = size[1] / size[3], 1 / 0.1
        pair = backend(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx, inv_t, c, 1e-7, True)
        expected = (*single(anchor_a, memory_a, idx, inv_t, log_z_a, c, 1e-7, True),
                    *single(anchor_b, memory_b, idx, inv_t, log_z_b, c, 1e-7, True))
        for got, want in zip(pair, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows_a, _, rows_b, _ = crd_nce.crd_nce_pair_op(anchor_a, memory_a, log_z_a, anchor_b, memory_b, log_z_b, idx,
                                                   0.1, size[1] / size[3], 1e-7, device, False)
    for anchor, memory, log_z, rows in ((anchor_a, memory_a, log_z_a, rows_a), (anchor_b, memory_b, log_z_b, rows_b)):
        ref = reference.crd_nce_loss(anchor.double(), memory.double(), idx, temperature=0.1, log_z=log_z,
                                     n_data=size[3], reduction="none")
        assert_close("pair rows", rows, ref, None, torch.float32)


@pytest.mark.parametrize("size", [(4, 300, 31, 100), (7, 5, 64, 2)])
def test_dense_path_equals_gathered_kernel_in_float64(size):
    """The dense GEMM path (chosen for B(K+1) >= 2N) is exact: it equals the gathered kernel."""
    anchor, memory, idx, log_z = crd_inputs(*size, torch.float64, torch.float64, torch.int64, "cpu")
    assert crd_nce.dense_wins(idx, memory)
    c, inv_t = size[1] / size[3], 1 / 0.07
    dense = crd_nce.dense_forward(anchor, memory, idx, inv_t, log_z, c, 1e-7, True)
    gathered = crd_nce.IMPLS["cpu"].kernel()(anchor, memory, idx, inv_t, log_z, c, 1e-7, True)
    for got, want in zip(dense, gathered):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


def test_gradcheck_cpu_kernel_float64():
    anchor, memory, idx, log_z = crd_inputs(3, 7, 5, 40, torch.float64, torch.float64, torch.int64, "cpu")
    anchor.requires_grad_(True)
    torch.autograd.gradcheck(lambda a: functional.crd_nce_loss(a, memory, idx, temperature=0.5, log_z=log_z,
                                                               reduction="none", backend="cpu"), (anchor,))


def test_opcheck_custom_ops():
    anchor, memory, idx, log_z = crd_inputs(3, 9, 8, 40, torch.float32, torch.float32, torch.int64, "cpu")
    anchor.requires_grad_(True)
    torch.library.opcheck(crd_nce.crd_nce_op, (anchor, memory, idx, log_z, 0.1, 0.2, 1e-7, "cpu", True))
    anchor_b = torch.randn_like(anchor, requires_grad=True)
    torch.library.opcheck(crd_nce.crd_nce_pair_op,
                          (anchor, memory, log_z, anchor_b, memory.flip(0), log_z, idx, 0.1, 0.2, 1e-7, "cpu", True))


def test_backward_through_no_grad_forward_raises():
    anchor, memory, idx, log_z = crd_inputs(2, 3, 4, 40, torch.float32, torch.float32, torch.int64, "cpu")
    anchor.requires_grad_(True)
    rows, _ = crd_nce.crd_nce_op(anchor, memory, idx, log_z, 0.1, 0.1, 1e-7, "cpu", False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        rows.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fp32_loss_at_70k_negatives_is_accurate(backend):
    """K = 70,000 fp32 terms per row: summed in order in fp32 they drift (1.8e-4 relative on 'cpu'). The CPU
    kernel sums each row in fp64, the CUDA kernel in a tree (64 columns a warp, 8 warps, one atomic a block
    of 512 columns), the reference in log space: all stay near fp32 rounding."""
    b, k, d, n = 2, 70_000, 128, 100_000
    anchor, memory, idx, _ = crd_inputs(b, k, d, n, torch.float64, torch.float64, torch.int64, "cpu")
    log_z = reference.crd_log_z(anchor, memory, idx, temperature=0.07)
    kw = dict(temperature=0.07, log_z=log_z, reduction="none")
    exact = reference.crd_nce_loss(anchor, memory, idx, **kw)
    device = "cuda" if backend == "cuda" else "cpu"
    anchor, memory, idx = anchor.float().to(device), memory.float().to(device), idx.to(device)
    fast = functional.crd_nce_loss(anchor, memory, idx, backend=backend, **kw)
    assert not crd_nce.dense_wins(idx, memory)
    assert float(((fast.double().cpu() - exact).abs() / exact).max()) < 3e-6


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_float_log_z_keeps_float64(backend):
    """A Python float log_z used to pass through float32 (5e-9 relative error in float64 CRD)."""
    anchor, memory, idx, _ = crd_inputs(5, 40, 16, 300, torch.float64, torch.float64, torch.int64, "cpu")
    log_z = 7.123456789012345
    got = functional.crd_nce_loss(anchor, memory, idx, temperature=0.1, log_z=log_z, reduction="none",
                                  backend=backend)
    want = reference.crd_nce_loss(anchor, memory, idx, temperature=0.1, log_z=torch.tensor(log_z, dtype=torch.float64),
                                  reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_huge_logits_give_the_exact_finite_loss_on_every_backend(backend):
    """The issue's repro: T = 0.01 made the 'torch' backend return inf where the loss is ~200."""
    anchor = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    memory = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    idx = torch.tensor([[0, 1]])
    c, eps = 0.5, 1e-7
    # exact by hand: l = s/T - log Z - log(c + eps) with log Z = 0, softplus(-l0) + softplus(l1) + log1p(eps / c)
    l0, l1 = -100 - math.log(c + eps), 100 - math.log(c + eps)
    want = math.log1p(math.exp(-abs(l0))) - l0 + l1 + math.log1p(math.exp(-l1)) + math.log1p(eps / c)
    for scale in (1.0, 10.0):
        got = functional.crd_nce_loss(anchor * scale, memory * scale, idx, temperature=0.01, log_z=0.0,
                                      backend=backend)
        assert torch.isfinite(got)
        if scale == 1.0:
            assert float(got) == pytest.approx(want, rel=1e-14)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_crd_log_z_cpu_kernel_matches_float64_reference(size, dtypes, idx_dtype):
    """csrc/cpu/crd_nce.cpp's crd_log_z: the scores in the accumulation dtype, their log-sum-exp in fp64."""
    b, k, d, n = size
    anchor, memory, idx, _ = crd_inputs(b, k, d, n, *dtypes, idx_dtype, "cpu")
    got = functional.crd_log_z(anchor, memory, idx, temperature=0.07, n_data=2 * n, backend="cpu")
    want = reference.crd_log_z(anchor.double(), memory.double(), idx, temperature=0.07, n_data=2 * n)
    assert got.dtype == (torch.float64 if dtypes[0] == torch.float64 else torch.float32)
    tol = 1e-12 if dtypes[0] == torch.float64 else 1e-5  # the scores' own rounding, over 1 / T = 14
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want)))
