"""relational_contrastive_loss (CRRCD) negatives: one fused Triton kernel per side (docs/ops/relational.md).

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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tiles import StaticConfig, dot_in_fp32, for_installed_triton, mma


@triton.jit
def relational_negatives_kernel(
    anchors_ptr, projected_ptr, neg_idx_ptr, fold_wt_ptr, fold_b_ptr, queries_ptr, offset_ptr,
    rows_ptr, grad_ptr,
    batch, num_neg, dim, inv_t,
    stride_a, stride_p, stride_n, stride_w, stride_q, stride_g,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    LOG_SUM_EXP: tl.constexpr, NEED_GRAD: tl.constexpr, DOT_IN_FP32: tl.constexpr,
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
    # G^T, padded with zeros outside dim x dim: padded columns of z stay 0 and drop out of the norm
    fold_wt = tl.load(fold_wt_ptr + d[:, None] * stride_w + d[None, :], mask=d_ok[:, None] & d_ok[None, :],
                      other=0.0)
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
        z = mma(u.to(fold_wt.dtype), fold_wt, DOT_IN_FP32)
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


# --- tiles by Triton version, precision and padded relation dim, chosen deterministically --------------
@dataclass(frozen=True)
class Tiles:
    block_k: int  # negative keys per step
    num_warps: int
    num_stages: int


def block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs >= 16


# {first Triton version: {(dot_in_fp32, padded relation dim): Tiles}}, each compiling without spills on sm_90
# and sm_80 (tests/lib/test_triton_static.py). G^T stays in registers for the whole program, so the
# fp32-accurate product (three operand pairs) only fits narrow key tiles (fp32 is not the fast path).
TILES = {
    (3, 6): {
        **{(False, d): Tiles(64, 8, 3) for d in (16, 32, 64, 128)},
        **{(True, d): Tiles(16, 8, 3) for d in (16, 32, 64, 128)},
    },
}
INSTALLED_TILES = for_installed_triton(TILES)


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype G and the gathered projections are stored in for the tensor-core product: fp16 and bf16
    stay themselves (bf16 keeps its range: fp16 would overflow past 65504), anything else is fp32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def supports(dim: int, anchors_dtype: torch.dtype, fold_weight_dtype: torch.dtype) -> bool:
    """Whether relational_negatives takes these inputs: the kernel computes in fp32, so float64 needs an
    exact path; a relation dim past the table's has no spill-free tile."""
    if torch.float64 in (anchors_dtype, fold_weight_dtype):
        return False
    return (dot_in_fp32(operand_dtype(fold_weight_dtype)), block_d(dim)) in INSTALLED_TILES


def relational_negatives(anchors, projected, neg_idx, fold_weight, fold_bias, queries, offset, temperature,
                         need_grad: bool, log_sum_exp: bool):
    """Host side of the kernel: (rows [R], grad_queries [R, d] or empty) in float32 (see module doc).

    For inputs that `supports` accepts. The kernel computes in float32; the GEMM's operands are stored in
    operand_dtype(fold_weight.dtype): fp16 and bf16 run natively on tensor cores (with 16-bit gathered
    projections, half the bytes), fp32 at float32 accuracy (kernels/_tiles.py).
    """
    batch, dim = anchors.shape
    rows_n, num_neg = queries.shape[0], neg_idx.shape[1]
    if not supports(dim, anchors.dtype, fold_weight.dtype):
        raise ValueError(f"relational_negatives: no kernel for {anchors.dtype} anchors / {fold_weight.dtype} "
                         f"fold_weight of relation dim {dim} (supports() says which inputs run)")
    operand = operand_dtype(fold_weight.dtype)
    in_fp32 = dot_in_fp32(operand)
    tiles = INSTALLED_TILES[(in_fp32, block_d(dim))]
    fold_wt = fold_weight.t().to(operand).contiguous()
    projected = projected.to(operand).contiguous()
    anchors, queries, fold_bias = (t.float().contiguous() for t in (anchors, queries, fold_bias))
    neg_idx = neg_idx.contiguous()
    rows = torch.empty(rows_n, dtype=torch.float32, device=anchors.device)
    grad = torch.empty((rows_n, dim) if need_grad else (1, dim), dtype=torch.float32, device=anchors.device)
    if rows_n:
        relational_negatives_kernel[(rows_n,)](
            anchors, projected, neg_idx, fold_wt, fold_bias, queries, offset.reshape(1).float(), rows, grad,
            batch, num_neg, dim, 1.0 / temperature,
            anchors.stride(0), projected.stride(0), neg_idx.stride(0), fold_wt.stride(0), queries.stride(0),
            grad.stride(0),
            LOG_SUM_EXP=log_sum_exp, NEED_GRAD=need_grad, DOT_IN_FP32=in_fp32, BLOCK_K=tiles.block_k,
            BLOCK_D=block_d(dim), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return rows, (grad if need_grad else grad[:0].reshape(0))


# --- every configuration relational_negatives can launch on the installed Triton, for the static checks --
def static_configs(tiles_by_key: dict) -> list[StaticConfig]:
    configs = []
    for (in_fp32, d_block), tiles in tiles_by_key.items():
        for dtype in (("fp32",) if in_fp32 else ("bf16", "fp16")):
            signature = {
                "anchors_ptr": "*fp32", "projected_ptr": f"*{dtype}", "neg_idx_ptr": "*i64",
                "fold_wt_ptr": f"*{dtype}", "fold_b_ptr": "*fp32", "queries_ptr": "*fp32", "offset_ptr": "*fp32",
                "rows_ptr": "*fp32", "grad_ptr": "*fp32", "batch": "i32", "num_neg": "i32", "dim": "i32",
                "inv_t": "fp32", "stride_a": "i32", "stride_p": "i32", "stride_n": "i32", "stride_w": "i32",
                "stride_q": "i32", "stride_g": "i32",
            }
            for log_sum_exp, need_grad in ((False, True), (False, False), (True, False)):
                mode = "lse" if log_sum_exp else ("loss_grad" if need_grad else "loss")
                configs.append(StaticConfig(
                    name=f"relational_negatives_{dtype}_d{d_block}_{mode}", fn=relational_negatives_kernel,
                    signature=signature,
                    constexprs=dict(BLOCK_K=tiles.block_k, BLOCK_D=d_block, LOG_SUM_EXP=log_sum_exp,
                                    NEED_GRAD=need_grad, DOT_IN_FP32=in_fp32),
                    num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                    mma="tf32" if in_fp32 else dtype.replace("fp", "f"), expect_wgmma=not in_fp32))
    return configs


STATIC_CONFIGS = static_configs(INSTALLED_TILES)
