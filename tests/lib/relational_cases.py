"""relational_contrastive_loss cases shared by the CPU tests, the Triton-interpreter tests and the GPU tests.

Rows are pairs (R = B(B-1)), not samples, so this file has its own loss-and-gradient check in the spirit
of loss_checks.py: loss AND every gradient (e_s and all 13 parameters) against the float64 reference,
grad_output != 1, a no-grad forward; error <= same-dtype torch error + per-dtype tol (gdrd_fast.testing).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import relational
from gdrd_fast import RelationalParams
from gdrd_fast.testing import assert_close

TEMPERATURE, N_DATA = 0.1, 5000
HALF = (torch.float16, torch.bfloat16)
# (batch B, embedding dim D, relation dim d, queue length Q, negatives K): odd sizes, K = 1, K past a tile
SIZES = [(2, 31, 17, 7, 1), (5, 100, 31, 50, 123), (3, 64, 128, 300, 70)]
# the Triton interpreter pays Python time per tile operation: each dtype once, every size once; float64
# runs the exact chunked path (the kernel computes in float32)
INTERPRETER_CASES = [(torch.float32, SIZES[0]), (torch.float32, SIZES[1]), (torch.float16, SIZES[2]),
                     (torch.bfloat16, SIZES[1]), (torch.float64, SIZES[1])]


def size_id(dtype, sizes) -> str:
    return "{}-B{}-D{}-d{}-Q{}-K{}".format(str(dtype).split(".")[1], *sizes)


def make_case(batch, embed, rel, queue, num_neg, device="cpu") -> dict:
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
    return dict(e_t=unit(batch, embed), e_s=unit(batch, embed), queue_t=unit(queue, embed),
                queue_s=unit(queue, embed), neg_idx=torch.randint(queue, (batch, num_neg), device=device),
                params=params)


def cast(case: dict, dtype: torch.dtype) -> dict:
    """Fresh leaves in `dtype` (parameters stay float32 under half dtypes, as with autocast)."""
    param_dtype = torch.float32 if dtype in HALF else dtype
    out = {k: case[k].to(dtype, copy=True) for k in ("e_t", "e_s", "queue_t", "queue_s")}
    out["e_s"].requires_grad_(True)
    out["e_t"].requires_grad_(True)  # must receive no gradient
    out["neg_idx"] = case["neg_idx"]
    out["params"] = RelationalParams(*(t.to(param_dtype, copy=True).requires_grad_(True) for t in case["params"]))
    return out


def _run(inputs, backend, reduction, grad_output, log_z):
    kw = dict(temperature=TEMPERATURE, log_z_t=log_z[0], log_z_s=log_z[1], n_data=N_DATA, reduction=reduction,
              backend=backend)
    loss = gdrd_fast.relational_contrastive_loss(**inputs, **kw)
    leaves = {"e_s": inputs["e_s"], **{f"params.{k}": v for k, v in inputs["params"]._asdict().items()}}
    grads = torch.autograd.grad(loss, list(leaves.values()), grad_output.to(loss.dtype))
    assert inputs["e_t"].grad is None
    with torch.no_grad():
        no_grad_loss = gdrd_fast.relational_contrastive_loss(**inputs, **kw)
    assert not no_grad_loss.requires_grad
    return {"loss": loss, "no-grad loss": no_grad_loss, **{f"d {k}": g for k, g in zip(leaves, grads)}}


def check_backend(backend: str, dtype: torch.dtype, sizes, reduction: str = "none", device: str = "cpu") -> None:
    case = make_case(*sizes, device=device)
    # Z as the module freezes it: estimated once on float64 inputs, then a fixed scalar
    log_z = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    rows = sizes[0] * (sizes[0] - 1)
    grad_output = (torch.rand(rows, dtype=torch.float64, device=device) * 2 + 0.5 if reduction == "none"
                   else torch.tensor(-1.7, dtype=torch.float64, device=device))
    ref64 = _run(cast(case, torch.float64), "torch", reduction, grad_output, log_z)
    same_dtype = _run(cast(case, dtype), "torch", reduction, grad_output, log_z)
    fast = _run(cast(case, dtype), backend, reduction, grad_output, log_z)
    for name in ref64:
        assert fast[name].dtype == same_dtype[name].dtype, name
        assert_close(f"{backend} {size_id(dtype, sizes)} {reduction}: {name}", fast[name], ref64[name],
                     same_dtype[name], dtype)


def check_log_z(backend: str, dtypes, sizes, device: str = "cpu") -> None:
    case = make_case(*sizes, device=device)
    ref = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    for dtype in dtypes:
        inputs = cast(case, dtype)
        same = reference.relational_log_z(**inputs, temperature=TEMPERATURE, n_data=N_DATA)
        fast = gdrd_fast.relational_log_z(**inputs, temperature=TEMPERATURE, n_data=N_DATA, backend=backend)
        for name, f, r, s in zip(("log_z_t", "log_z_s"), fast, ref, same):
            assert_close(f"{backend} {dtype} {name}", f, r, s, dtype)


def check_nan_poisons_the_loss(backend: str, device: str = "cpu") -> None:
    """The NaN policy (gdrd_fast/validation.py): where value checks run (CPU tensors), a NaN in a queue
    raises naming it; where they do not (GPU without set_checks(True)), it must show in the loss."""
    case = make_case(3, 16, 16, 10, 5, device=device)
    log_z = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    case["queue_t"][case["neg_idx"][1, 2]] = float("nan")
    inputs = cast(case, torch.float32)
    inputs["e_t"].requires_grad_(False)

    def loss():
        return gdrd_fast.relational_contrastive_loss(**inputs, temperature=TEMPERATURE, log_z_t=log_z[0],
                                                     log_z_s=log_z[1], n_data=N_DATA, backend=backend)

    if device == "cpu":
        with pytest.raises(ValueError, match="queue_t contains NaN"):
            loss()
    else:
        assert torch.isnan(loss())


def check_opcheck(backend: str, device: str = "cpu") -> None:
    """gdrd_fast::relational_negatives in all three modes passes torch.library.opcheck."""
    b, d, q, k = 4, 20, 15, 9
    queries = F.normalize(torch.randn(b * (b - 1), d, device=device), dim=1)
    inputs = (torch.randn(b, d, device=device), torch.randn(q, d, device=device),
              torch.randint(q, (b, k), device=device), torch.randn(d, d, device=device), torch.randn(d, device=device))
    for need_grad, log_sum_exp in ((True, False), (False, False), (False, True)):
        args = (*inputs, queries.clone().requires_grad_(need_grad), torch.tensor(0.3, device=device), TEMPERATURE,
                backend, need_grad, log_sum_exp)
        torch.library.opcheck(relational.relational_negatives_op, args)


def check_bf16_large_inputs(backend: str, device: str = "cpu", scale: float = 1e5) -> None:
    """bf16 embeddings and queues of magnitude `scale` (past fp16's 65504): the loss matches the cpu
    backend's on the same bf16 inputs (a 16-bit product in fp16 would overflow to NaN)."""
    case = make_case(4, 32, 32, 40, 30, device=device)
    for name in ("e_t", "e_s", "queue_t", "queue_s"):
        case[name] = case[name] * scale
    log_z = reference.relational_log_z(**case, temperature=TEMPERATURE, n_data=N_DATA)
    kw = dict(temperature=TEMPERATURE, log_z_t=log_z[0], log_z_s=log_z[1], n_data=N_DATA)
    inputs = cast(case, torch.bfloat16)
    with torch.no_grad():
        fast = gdrd_fast.relational_contrastive_loss(**inputs, **kw, backend=backend)
        cpu = gdrd_fast.relational_contrastive_loss(**{k: (v.cpu() if torch.is_tensor(v) else v)
                                                       for k, v in inputs.items() if k != "params"},
                                                    params=RelationalParams(*(t.cpu() for t in inputs["params"])),
                                                    **kw, backend="cpu")
        ref64 = gdrd_fast.relational_contrastive_loss(**cast(case, torch.float64), **kw, backend="torch")
    assert torch.isfinite(fast), f"{backend}: loss {fast.item()} on bf16 inputs of magnitude {scale:g}"
    assert_close(f"{backend} bf16 x{scale:g}", fast.float().cpu(), ref64.cpu(), cpu.float(), torch.bfloat16)
