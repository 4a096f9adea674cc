"""CRRCD negatives: one fused Triton kernel per side (ops.md section 3, method.md section 3).

For pair row r = (i, j) (i != j, i-major) and its K queue negatives n = neg_idx[j, k]:
    key_rk = normalize(G @ relu(A_i - P_n) + g)        (the relation net's last layer and the critic head
                                                        folded into one d x d map G, bias g)
    l_rk   = <q_r, key_rk> / temperature - offset       (offset = log Z + log(K / n_data + eps))
The kernel returns sum_k softplus(l_rk) and d/dq_r = sum_k sigmoid(l_rk) key_rk / temperature, or, in
log-sum-exp mode, logsumexp_k(<q_r, key_rk> / temperature) (relational_log_z). Keys are stop-grad, so
nothing else needs a gradient; nothing of size R x K is ever stored.

One program per row, looping over tiles of BLOCK_K keys: the prologue u = relu(A_i - P_tile) feeds a
tensor-core GEMM u @ G^T, then bias, row norm, dot with q_r, softplus and the dq accumulation, all in
registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdrd_fast import backends


@triton.jit
def relational_negatives_kernel(
    anchors_ptr, projected_ptr, neg_idx_ptr, fold_wt_ptr, fold_wt_lo_ptr, fold_b_ptr, queries_ptr, offset_ptr,
    rows_ptr, grad_ptr,
    batch, num_neg, dim, inv_t,
    stride_a, stride_p, stride_n, stride_w, stride_q, stride_g,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    LOG_SUM_EXP: tl.constexpr, NEED_GRAD: tl.constexpr, GEMM: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    i = r // (batch - 1)
    jj = r % (batch - 1)
    j = jj + (jj >= i).to(tl.int64)  # row r = (i, j) skips j == i

    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    anchor = tl.load(anchors_ptr + i * stride_a + d, mask=d_ok, other=0.0)
    query = tl.load(queries_ptr + r * stride_q + d, mask=d_ok, other=0.0)
    bias = tl.load(fold_b_ptr + d, mask=d_ok, other=0.0)
    # G^T, padded with zeros outside dim x dim: padded columns of z stay 0 and drop out of the norm.
    # Loaded inside the loop: it stays in L2, and the compiler streams it to shared memory for the MMA
    # instead of pinning d x d values in registers.
    fold_wt_offsets = d[:, None] * stride_w + d[None, :]
    fold_wt_mask = d_ok[:, None] & d_ok[None, :]
    offset = tl.load(offset_ptr)

    total = tl.zeros((), dtype=tl.float32)   # sum of softplus, or the running sum of exp
    run_max = tl.full((), float("-inf"), dtype=tl.float32)
    grad = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, num_neg, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < num_neg
        n = tl.load(neg_idx_ptr + j * stride_n + k, mask=k_ok, other=0).to(tl.int64)
        p = tl.load(projected_ptr + n[:, None] * stride_p + d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        # maximum that keeps NaN: a NaN queue row must poison the loss, as in the reference
        u = tl.maximum(anchor[None, :] - p, 0.0, propagate_nan=tl.PropagateNan.ALL)
        fold_wt = tl.load(fold_wt_ptr + fold_wt_offsets, mask=fold_wt_mask, other=0.0)
        if GEMM == "bf16x3":  # float32 operands as hi + lo bf16 parts; lo x lo is below float32 rounding
            u_hi = u.to(tl.bfloat16)
            u_lo = (u - u_hi.to(tl.float32)).to(tl.bfloat16)
            fold_wt_lo = tl.load(fold_wt_lo_ptr + fold_wt_offsets, mask=fold_wt_mask, other=0.0)
            z = tl.dot(u_hi, fold_wt_lo)
            z = tl.dot(u_lo, fold_wt, z)
            z = tl.dot(u_hi, fold_wt, z)
        elif GEMM == "ieee":
            z = tl.dot(u, fold_wt, input_precision="ieee")
        else:
            z = tl.dot(u.to(fold_wt.dtype), fold_wt)
        z = z + bias[None, :]
        inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(z * z, 1)), 1e-12)  # F.normalize's eps
        s = tl.sum(z * query[None, :], 1) * inv_norm * inv_t
        if LOG_SUM_EXP:
            s = tl.where(k_ok, s, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(s, 0))
            total = total * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max), 0)
            run_max = new_max
        else:
            logit = s - offset
            # softplus(x) = max(x, 0) + log1p(exp(-|x|)), stable for any x
            softplus = tl.maximum(logit, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(logit)))
            total += tl.sum(tl.where(k_ok, softplus, 0.0), 0)
            if NEED_GRAD:
                weight = tl.where(k_ok, inv_t * inv_norm / (1.0 + tl.exp(-logit)), 0.0)
                grad += tl.sum(z * weight[:, None], 0)
    if LOG_SUM_EXP:
        total = run_max + tl.log(total)
    tl.store(rows_ptr + r, total)
    if NEED_GRAD:
        tl.store(grad_ptr + r * stride_g + d, grad, mask=d_ok)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _gemm_mode(operand_dtype: torch.dtype) -> str:
    """How the kernel runs u @ G^T: fp16 operands natively on tensor cores; anything else at float32
    accuracy, as three bf16 products (hi/lo split, ~2^-16 relative error), or plainly in the
    interpreter, whose bf16 tl.dot is wrong (environment.md)."""
    if operand_dtype == torch.float16:
        return "native"
    return "ieee" if backends.interpreter_mode() else "bf16x3"


def _launch_config(dim: int, num_neg: int, gemm: str) -> dict:
    """A fixed choice per shape (deterministic, no autotuning), sized so that ptxas reports 0 spills for
    the shipped d = 128 configurations on sm_90 and sm_80. The split float32 GEMM holds three operand
    pairs, which only fits narrow key tiles (mma.sync rather than wgmma: fp32 is not the fast path)."""
    block_d = _block_d(dim)
    block_k, num_warps = (16, 8) if gemm == "bf16x3" else (64, 8)
    if block_d > 128:
        block_k = max(16, block_k // 2)
    block_k = min(block_k, max(16, triton.next_power_of_2(num_neg)))
    return dict(BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)


def _fold_operands(fold_weight, gemm: str):
    """G^T as the kernel's GEMM operands: (G^T, its low bf16 part, used only by 'bf16x3')."""
    fold_wt = fold_weight.t().contiguous()
    if gemm == "native":
        return fold_wt, fold_wt
    fold_wt = fold_wt.float()
    if gemm == "ieee":
        return fold_wt, fold_wt
    hi = fold_wt.to(torch.bfloat16)
    return hi, (fold_wt - hi.float()).to(torch.bfloat16)


def relational_negatives(anchors, projected, neg_idx, fold_weight, fold_bias, queries, offset, temperature,
                         need_grad: bool, log_sum_exp: bool):
    """Host side of the kernel: (rows [R], grad_queries [R, d] or empty) in float32 (see module doc).

    The kernel computes in float32 whatever the inputs (float64 included); only the GEMM's operands
    follow fold_weight's dtype: fp16 runs natively on tensor cores, others at float32 accuracy.
    """
    batch, dim = anchors.shape
    rows_n, num_neg = queries.shape[0], neg_idx.shape[1]
    gemm = _gemm_mode(fold_weight.dtype)
    fold_wt, fold_wt_lo = _fold_operands(fold_weight, gemm)
    # projected rows are the gathered operand: fp16 with fp16 GEMMs (half the bytes), else float32
    projected = projected.to(torch.float16 if gemm == "native" else torch.float32).contiguous()
    anchors, queries, fold_bias = (t.float().contiguous() for t in (anchors, queries, fold_bias))
    neg_idx = neg_idx.contiguous()
    rows = torch.empty(rows_n, dtype=torch.float32, device=anchors.device)
    grad = torch.empty((rows_n, dim) if need_grad else (1, dim), dtype=torch.float32, device=anchors.device)
    if rows_n:
        relational_negatives_kernel[(rows_n,)](
            anchors, projected, neg_idx, fold_wt, fold_wt_lo, fold_bias, queries, offset.reshape(1).float(),
            rows, grad, batch, num_neg, dim, 1.0 / temperature,
            anchors.stride(0), projected.stride(0), neg_idx.stride(0), fold_wt.stride(0), queries.stride(0),
            grad.stride(0),
            LOG_SUM_EXP=log_sum_exp, NEED_GRAD=need_grad, GEMM=gemm, **_launch_config(dim, num_neg, gemm))
    return rows, (grad if need_grad else grad[:0].reshape(0))


def _static_config(dtype: str, block_d: int, log_sum_exp: bool, need_grad: bool) -> dict:
    """One shipped launch: `dtype` is fold_weight's (fp32 runs the bf16x3 GEMM)."""
    gemm = "bf16x3" if dtype == "fp32" else "native"
    operand = "bf16" if dtype == "fp32" else dtype
    cfg = _launch_config(block_d, 512, gemm)
    signature = {
        "anchors_ptr": "*fp32", "projected_ptr": "*fp32" if dtype == "fp32" else "*fp16", "neg_idx_ptr": "*i64", "fold_wt_ptr": f"*{operand}",
        "fold_wt_lo_ptr": f"*{operand}", "fold_b_ptr": "*fp32", "queries_ptr": "*fp32", "offset_ptr": "*fp32",
        "rows_ptr": "*fp32", "grad_ptr": "*fp32", "batch": "i32", "num_neg": "i32", "dim": "i32",
        "inv_t": "fp32", "stride_a": "i32", "stride_p": "i32", "stride_n": "i32", "stride_w": "i32",
        "stride_q": "i32", "stride_g": "i32",
    }
    mode = "lse" if log_sum_exp else ("loss_grad" if need_grad else "loss")
    return dict(
        fn=relational_negatives_kernel, signature=signature,
        constexprs=dict(BLOCK_K=cfg["BLOCK_K"], BLOCK_D=block_d, LOG_SUM_EXP=log_sum_exp, NEED_GRAD=need_grad,
                        GEMM=gemm),
        num_warps=cfg["num_warps"], expect_wgmma=gemm == "native",
        name=f"relational_negatives_{dtype}_d{block_d}_{mode}")


# What CI compiles ahead of time (kernels/_aot.py, tests/test_triton_static.py): every mode at the
# method's d = 128 for both operand dtypes gdrd_fast.ops.relational passes (fp16 for half inputs, fp32).
STATIC_CONFIGS = [
    _static_config(dot, 128, lse, grad)
    for dot in ("fp16", "fp32")
    for lse, grad in ((False, True), (False, False), (True, False))
]
