"""relational_contrastive_loss fast paths against the float64 reference: the chunked 'cpu' backend here,
the Triton kernel on a GPU (marked cuda; the same kernel runs on CPU in tests/lib/interpreter/interp_relational.py).
Also: the custom op's opcheck, torch.compile without graph breaks, the cpu backend's chunking, NaN
propagation and the Module end to end."""
import pytest
import torch
import torch.nn.functional as F

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import relational
from relational_cases import (N_DATA, SIZES, TEMPERATURE, cast, check_backend, check_bf16_large_inputs, check_log_z,
                              check_nan_poisons_the_loss, check_opcheck, make_case, size_id)

CPU_CASES = [(torch.float64, SIZES[0]), (torch.float64, SIZES[1]), (torch.float32, SIZES[2]),
             (torch.float16, SIZES[1]), (torch.bfloat16, SIZES[2])]


@pytest.mark.parametrize("dtype,sizes", CPU_CASES, ids=[size_id(*c) for c in CPU_CASES])
def test_cpu_backend_matches_float64(dtype, sizes):
    check_backend("cpu", dtype, sizes)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpu_backend_reductions(reduction):
    check_backend("cpu", torch.float32, (4, 40, 24, 30, 33), reduction)


def test_cpu_log_z_matches_float64():
    check_log_z("cpu", (torch.float64, torch.float32, torch.float16), (5, 48, 20, 40, 77))


def test_cpu_nan_in_a_queue_row_poisons_the_loss():
    check_nan_poisons_the_loss("cpu")


def test_cpu_negatives_op_passes_opcheck():
    check_opcheck("cpu")


def test_chunking_does_not_change_the_result():
    """The cpu backend's row chunks (a bounded slice of R x K x d) add up to the unchunked result."""
    b, d, q, k = 6, 24, 20, 37
    args = (torch.randn(b, d, dtype=torch.float64), torch.randn(q, d, dtype=torch.float64),
            torch.randint(q, (b, k)), torch.randn(d, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64),
            F.normalize(torch.randn(b * (b - 1), d, dtype=torch.float64), dim=1),
            torch.tensor(0.3, dtype=torch.float64), TEMPERATURE)
    for need_grad, log_sum_exp in ((True, False), (False, True)):
        whole = relational.relational_negatives_chunked(*args, need_grad, log_sum_exp, max_elements=1 << 30)
        row_by_row = relational.relational_negatives_chunked(*args, need_grad, log_sum_exp, max_elements=1)
        for a, b_ in zip(whole, row_by_row):
            torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_module_cpu_backend_matches_torch_backend():
    """The Module end to end (queue fill, Z freeze, loss, gradients) on 'cpu' equals 'torch' (float64)."""
    results = {}
    for backend in ("torch", "cpu"):
        torch.manual_seed(7)
        module = gdrd_fast.RelationalContrastiveLoss(embed_dim=24, rel_dim=16, num_negatives=5, queue_size=8,
                                                     n_data=100, backend=backend).double()
        gen = torch.Generator().manual_seed(3)
        out = []
        for _ in range(3):
            e_t = F.normalize(torch.randn(4, 24, generator=gen, dtype=torch.float64), dim=1)
            e_s = F.normalize(torch.randn(4, 24, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
            loss = module(e_t, e_s, torch.randint(3, (4,), generator=gen))
            loss.backward()
            out += [loss.detach(), e_s.grad, module.cross_critic.weight.grad.clone(), module.log_z_s.clone()]
        results[backend] = out
    assert float(results["torch"][-4]) != 0.0  # the queue filled and the loss became active
    for a, b in zip(results["torch"], results["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)  # Z is NaN until set


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradients_are_bitwise_reproducible(backend):
    """Same inputs, same bits: the pair gathers' backward must not accumulate in thread order (CPU
    indexing's backward uses parallel atomic adds; the demo's GDRD numbers drifted between runs)."""
    case = cast(make_case(64, 48, 16, 300, 9), torch.float32)
    grads = []
    for _ in range(6):
        e_s = case["e_s"].detach().clone().requires_grad_(True)
        loss = gdrd_fast.relational_contrastive_loss(case["e_t"], e_s, case["queue_t"], case["queue_s"],
                                                     case["neg_idx"], case["params"], temperature=0.1, log_z_t=3.0,
                                                     log_z_s=3.0, n_data=1000, backend=backend)
        grads.append(torch.autograd.grad(loss, e_s)[0])
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


GPU_CASES = [(dtype, sizes) for dtype in (torch.float32, torch.float16, torch.bfloat16)
             for sizes in [(16, 512, 128, 1000, 512), (7, 100, 31, 300, 123), (2, 33, 17, 5, 1)]]


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype,sizes", GPU_CASES, ids=[size_id(*c) for c in GPU_CASES])
def test_triton_backend_on_gpu_matches_float64(dtype, sizes):
    check_backend("auto", dtype, sizes, device="cuda")


@pytest.mark.cuda
@pytest.mark.triton
def test_triton_bf16_inputs_of_magnitude_1e5_on_gpu():
    """bf16 needs bf16 tensor-core operands: fp16 ones overflow past 65504 (the loss went NaN)."""
    check_bf16_large_inputs("triton", device="cuda")


@pytest.mark.cuda
@pytest.mark.triton
def test_triton_on_gpu_reductions_log_z_nan_opcheck():
    check_backend("auto", torch.bfloat16, (9, 64, 128, 200, 257), "mean", device="cuda")
    check_log_z("auto", (torch.float32, torch.float16, torch.bfloat16), (9, 64, 128, 200, 257), device="cuda")
    check_nan_poisons_the_loss("triton", device="cuda")
    check_opcheck("triton", device="cuda")


def test_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) through validation, the queries and the custom op; same loss and grads."""
    torch._dynamo.reset()
    case = make_case(4, 20, 12, 15, 9)
    log_z = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    inputs = cast(case, torch.float32)

    def step(e_s, params):
        return gdrd_fast.relational_contrastive_loss(
            inputs["e_t"], e_s, inputs["queue_t"], inputs["queue_s"], inputs["neg_idx"], params,
            temperature=TEMPERATURE, log_z_t=log_z[0], log_z_s=log_z[1], n_data=N_DATA, backend="cpu")

    leaves = [inputs["e_s"], *inputs["params"]]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(inputs["e_s"], inputs["params"])
    grads = torch.autograd.grad(loss, leaves)
    eager_loss = step(inputs["e_s"], inputs["params"])
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
