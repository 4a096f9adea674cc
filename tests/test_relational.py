"""relational_contrastive_loss fast backends ('cpu' chunked torch, 'triton' fused kernel) against the
float64 reference (ops.md sections 3 and 7): loss and every gradient, grad_output != 1, no-grad forward,
log Z, NaN propagation, the custom op's registration. Without a GPU the Triton kernel runs on CPU tensors
through the interpreter; the tests marked `cuda` run it compiled (benchmarks/gpu/run.sh).
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the kernels' import: @triton.jit reads it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gdrd_fast  # noqa: E402
from gdrd_fast import backends, reference  # noqa: E402
from gdrd_fast.ops import relational  # noqa: E402
from gdrd_fast.reference import RelationalParams  # noqa: E402
from gdrd_fast.testing import assert_close  # noqa: E402

TEMPERATURE, N_DATA = 0.1, 5000
HALF = (torch.float16, torch.bfloat16)


def _make_case(batch, embed, rel, queue, num_neg, device="cpu"):
    """Float64 master inputs: unit embeddings, Linear-like parameters, random negatives."""
    def unit(*shape):
        return F.normalize(torch.randn(*shape, dtype=torch.float64, device=device), dim=-1)

    def weight(rows, cols):
        return torch.randn(rows, cols, dtype=torch.float64, device=device) / cols ** 0.5

    def bias(n):
        return 0.1 * torch.randn(n, dtype=torch.float64, device=device)

    params = RelationalParams(
        ft_w1=weight(rel, embed), ft_b1=bias(rel), ft_w2=weight(rel, rel), ft_b2=bias(rel),
        fts_u=weight(rel, embed), fts_v=weight(rel, embed), fts_b1=bias(rel), fts_w2=weight(rel, rel),
        fts_b2=bias(rel), h1_w=weight(rel, rel), h1_b=bias(rel), h2_w=weight(rel, rel), h2_b=bias(rel))
    neg_idx = torch.randint(queue, (batch, num_neg), device=device)
    return dict(e_t=unit(batch, embed), e_s=unit(batch, embed), queue_t=unit(queue, embed),
                queue_s=unit(queue, embed), neg_idx=neg_idx, params=params)


def _cast(case, dtype):
    """Inputs in `dtype` (parameters stay float32 under half dtypes, as with autocast), fresh leaves."""
    param_dtype = torch.float32 if dtype in HALF else dtype
    out = {k: v.to(dtype, copy=True) for k, v in case.items() if k in ("e_t", "e_s", "queue_t", "queue_s")}
    out["e_s"].requires_grad_(True)
    out["e_t"].requires_grad_(True)  # must receive no gradient
    out["neg_idx"] = case["neg_idx"]
    out["params"] = RelationalParams(*(t.to(param_dtype, copy=True).requires_grad_(True) for t in case["params"]))
    return out


def _leaves(inputs):
    return {"e_s": inputs["e_s"], **{f"params.{k}": v for k, v in inputs["params"]._asdict().items()}}


def _run(inputs, backend, reduction, grad_output, log_z):
    loss = gdrd_fast.relational_contrastive_loss(
        **inputs, temperature=TEMPERATURE, log_z_t=log_z[0], log_z_s=log_z[1], n_data=N_DATA,
        reduction=reduction, backend=backend)
    leaves = _leaves(inputs)
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_output.to(loss.dtype))
    assert inputs["e_t"].grad is None
    with torch.no_grad():
        no_grad_loss = gdrd_fast.relational_contrastive_loss(
            **inputs, temperature=TEMPERATURE, log_z_t=log_z[0], log_z_s=log_z[1], n_data=N_DATA,
            reduction=reduction, backend=backend)
    return {"loss": loss, "no-grad loss": no_grad_loss, **{f"d {k}": g for k, g in zip(leaves, grads)}}


def _available(backend, device="cpu"):
    reason = relational.IMPLS[backend].unavailable(torch.device(device))
    if reason:
        pytest.skip(reason)


def _check_backend(backend, dtype, sizes, reduction, device="cpu"):
    _available(backend, device)
    case = _make_case(*sizes, device=device)
    # Z as the module freezes it: estimated once on float64 inputs, then a fixed scalar
    log_z = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    rows = sizes[0] * (sizes[0] - 1)
    grad_output = (torch.randn(rows, dtype=torch.float64, device=device) if reduction == "none"
                   else torch.tensor(-1.7, dtype=torch.float64, device=device))
    ref64 = _run(_cast(case, torch.float64), "torch", reduction, grad_output, log_z)
    same_dtype = _run(_cast(case, dtype), "torch", reduction, grad_output, log_z)
    fast = _run(_cast(case, dtype), backend, reduction, grad_output, log_z)
    for name in ref64:
        assert fast[name].dtype == same_dtype[name].dtype, name
        assert_close(f"{backend} {dtype} {sizes} {reduction}: {name}", fast[name], ref64[name], same_dtype[name],
                     dtype)


# (batch, embed dim D, relation dim d, queue length, negatives K): odd sizes, K = 1 and K past a tile
SIZES = [(2, 31, 17, 7, 1), (5, 100, 31, 50, 123), (3, 64, 128, 300, 70)]


def _ids(cases):
    return ["{}-B{}-D{}-d{}-Q{}-K{}".format(str(t).split(".")[1], *s) for t, s in cases]


CPU_CASES = [(torch.float64, SIZES[0]), (torch.float64, SIZES[1]), (torch.float32, SIZES[2]),
             (torch.float16, SIZES[1]), (torch.bfloat16, SIZES[2])]


@pytest.mark.parametrize("dtype,sizes", CPU_CASES, ids=_ids(CPU_CASES))
def test_cpu_backend_matches_reference(dtype, sizes):
    _check_backend("cpu", dtype, sizes, "mean")


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cpu_backend_reductions(reduction):
    _check_backend("cpu", torch.float32, (4, 40, 24, 30, 33), reduction)


# the interpreter costs Python time per tile operation: fewer cases, each dtype at least once
INTERPRETER_CASES = [(torch.float32, SIZES[0]), (torch.float32, SIZES[1]), (torch.float16, SIZES[2]),
                     (torch.bfloat16, SIZES[1])]


@pytest.mark.triton
@pytest.mark.parametrize("dtype,sizes", INTERPRETER_CASES, ids=_ids(INTERPRETER_CASES))
def test_triton_interpreter_matches_reference(dtype, sizes):
    _check_backend("triton", dtype, sizes, "mean")


@pytest.mark.triton
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_interpreter_reductions(reduction):
    _check_backend("triton", torch.float32, (3, 20, 16, 10, 9), reduction)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_log_z_matches_reference(backend):
    _available(backend)
    case = _make_case(5, 48, 20, 40, 77)
    ref = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    for dtype in (torch.float32, torch.float16):
        inputs = _cast(case, dtype)
        same = reference.relational_log_z(**inputs, temperature=TEMPERATURE, n_data=N_DATA)
        fast = gdrd_fast.relational_log_z(**inputs, temperature=TEMPERATURE, n_data=N_DATA, backend=backend)
        for name, f, r, s in zip(("log_z_t", "log_z_s"), fast, ref, same):
            assert_close(f"{backend} {dtype} {name}", f, r, s, dtype)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_nan_in_a_negative_queue_row_poisons_the_loss(backend):
    _available(backend)
    case = _make_case(3, 16, 16, 10, 5)
    case["queue_t"][case["neg_idx"][1, 2]] = float("nan")  # queues are not validated: NaN must show
    inputs = _cast(case, torch.float32)
    log_z = reference.relational_log_z(**_make_case(3, 16, 16, 10, 5), temperature=TEMPERATURE, n_data=N_DATA)
    loss = gdrd_fast.relational_contrastive_loss(**inputs, temperature=TEMPERATURE, log_z_t=log_z[0],
                                                 log_z_s=log_z[1], n_data=N_DATA, backend=backend)
    assert torch.isnan(loss)


def test_chunking_does_not_change_the_result():
    """The cpu backend's row chunks (a bounded R x K x d working set) add up to the unchunked result."""
    b, d, q, k = 6, 24, 20, 37
    args = (torch.randn(b, d, dtype=torch.float64), torch.randn(q, d, dtype=torch.float64),
            torch.randint(q, (b, k)), torch.randn(d, d, dtype=torch.float64), torch.randn(d, dtype=torch.float64),
            F.normalize(torch.randn(b * (b - 1), d, dtype=torch.float64), dim=1), torch.tensor(0.3, dtype=torch.float64))
    whole = relational.relational_negatives_chunked(*args, TEMPERATURE, True, False, max_elements=1 << 30)
    row_by_row = relational.relational_negatives_chunked(*args, TEMPERATURE, True, False, max_elements=1)
    for a, b_ in zip(whole, row_by_row):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_negatives_op_passes_opcheck(backend):
    _available(backend)
    b, d, q, k = 4, 20, 15, 9
    queries = F.normalize(torch.randn(b * (b - 1), d), dim=1)
    inputs = (torch.randn(b, d), torch.randn(q, d), torch.randint(q, (b, k)), torch.randn(d, d), torch.randn(d))
    for need_grad, log_sum_exp in ((True, False), (False, False), (False, True)):
        args = (*inputs, queries.clone().requires_grad_(need_grad), torch.tensor(0.3), TEMPERATURE, backend,
                need_grad, log_sum_exp)
        torch.library.opcheck(relational.relational_negatives_op, args)


def test_module_cpu_backend_matches_torch_backend():
    """The Module end to end (queue fill, Z freeze, loss) gives the same values on 'cpu' and 'torch'."""
    losses = {}
    for backend in ("torch", "cpu"):
        torch.manual_seed(7)
        module = gdrd_fast.RelationalContrastiveLoss(embed_dim=24, rel_dim=16, num_negatives=5, queue_size=8,
                                                     n_data=100, backend=backend).double()
        gen = torch.Generator().manual_seed(3)
        out = []
        for _ in range(3):
            e_t = F.normalize(torch.randn(4, 24, generator=gen, dtype=torch.float64), dim=1)
            e_s = F.normalize(torch.randn(4, 24, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
            labels = torch.randint(3, (4,), generator=gen)
            loss = module(e_t, e_s, labels)
            loss.backward()
            out += [loss.detach(), e_s.grad, module.h2_w.grad.clone()]
        losses[backend] = out
    assert float(losses["torch"][-3]) != 0.0  # the queue filled and the loss became active
    for a, b in zip(losses["torch"], losses["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("sizes", [(16, 512, 128, 1000, 512), (7, 100, 31, 300, 123)],
                         ids=lambda s: "B{}-D{}-d{}-Q{}-K{}".format(*s))
def test_triton_gpu_matches_reference(dtype, sizes):
    _check_backend("triton", dtype, sizes, "mean", device="cuda")


@pytest.mark.cuda
@pytest.mark.triton
def test_triton_gpu_log_z_and_none_reduction():
    _check_backend("triton", torch.bfloat16, (9, 64, 128, 200, 257), "none", device="cuda")
    case = _make_case(9, 64, 128, 200, 257, device="cuda")
    ref = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    for dtype in (torch.float32, torch.bfloat16):
        inputs = _cast(case, dtype)
        same = reference.relational_log_z(**inputs, temperature=TEMPERATURE, n_data=N_DATA)
        fast = gdrd_fast.relational_log_z(**inputs, temperature=TEMPERATURE, n_data=N_DATA, backend="triton")
        for name, f, r, s in zip(("log_z_t", "log_z_s"), fast, ref, same):
            assert_close(f"triton cuda {dtype} {name}", f, r, s, dtype)
