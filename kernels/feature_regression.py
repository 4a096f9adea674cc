"""feature_regression_loss in Triton: 1x1-conv projection + squared error, never storing the projection.

Inputs are viewed as columns: x [B, Cs, P] (P pixels per sample; P = 1 for [N, Cs] features), column
j = (sample j // P, pixel j % P). Each program owns BLOCK_P columns and walks the output channels in
tiles, recomputing Y = W X + bias from X tiles (tensor-core products):
- forward: per-column sum over channels of (Y - T)^2 -> [B * P] fp32, summed per sample on the host;
- backward: E = g_sample * (Y - T) per tile, then dX += W^T E (the program owns its columns), and
  dW += E X^T, dbias += sum E by fp32 atomics (order-dependent in the last bits, as cuBLAS split-K is).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tiles import StaticConfig, device_arch, dot_in_fp32, for_installed_triton, mma


@triton.jit
def _projection_error(x_ptr, w_ptr, bias_ptr, t_ptr, x_cols, t_cols, col_ok, o_start, Cs, Ct, P,
                      HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_P: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """(W X + bias - T) for output channels [o_start, o_start + BLOCK_O) of the program's columns, fp32."""
    outs = o_start + tl.arange(0, BLOCK_O)
    out_ok = outs < Ct
    y = tl.zeros([BLOCK_O, BLOCK_P], tl.float32)
    for k_start in range(0, Cs, BLOCK_K):
        ins = k_start + tl.arange(0, BLOCK_K)
        in_ok = ins < Cs
        w = tl.load(w_ptr + outs[:, None] * Cs + ins[None, :], mask=out_ok[:, None] & in_ok[None, :], other=0.0)
        x = tl.load(x_ptr + x_cols[None, :] + ins[:, None].to(tl.int64) * P, mask=in_ok[:, None] & col_ok[None, :],
                    other=0.0)
        y += mma(w, x, DOT_IN_FP32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + outs, mask=out_ok, other=0.0)[:, None]
    mask = out_ok[:, None] & col_ok[None, :]
    t = tl.load(t_ptr + t_cols[None, :] + outs[:, None].to(tl.int64) * P, mask=mask, other=0.0)
    return tl.where(mask, y - t.to(tl.float32), 0.0)


@triton.jit
def _column_offsets(start, B, Cs, Ct, P, BLOCK_P: tl.constexpr):
    cols = start + tl.arange(0, BLOCK_P)
    col_ok = cols < B * P
    sample = (cols // P).to(tl.int64)
    pixel = (cols % P).to(tl.int64)
    return cols, col_ok, sample, sample * Cs * P + pixel, sample * Ct * P + pixel


@triton.jit
def _feature_regression_fwd_kernel(x_ptr, w_ptr, bias_ptr, t_ptr, col_sq_ptr, B, Cs, Ct, P,
                                   HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                                   BLOCK_P: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    cols, col_ok, _, x_cols, t_cols = _column_offsets(tl.program_id(0) * BLOCK_P, B, Cs, Ct, P, BLOCK_P)
    col_sq = tl.zeros([BLOCK_P], tl.float32)
    for o_start in range(0, Ct, BLOCK_O):
        err = _projection_error(x_ptr, w_ptr, bias_ptr, t_ptr, x_cols, t_cols, col_ok, o_start, Cs, Ct, P,
                                HAS_BIAS, BLOCK_O, BLOCK_K, BLOCK_P, DOT_IN_FP32)
        col_sq += tl.sum(err * err, 0)
    tl.store(col_sq_ptr + cols, col_sq, mask=col_ok)


@triton.jit
def _feature_regression_bwd_kernel(x_ptr, w_ptr, bias_ptr, t_ptr, grad_rows_ptr, grad_x_ptr, grad_w_ptr,
                                   grad_bias_ptr, B, Cs, Ct, P, scale,
                                   HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                                   BLOCK_P: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    cols, col_ok, sample, x_cols, t_cols = _column_offsets(tl.program_id(0) * BLOCK_P, B, Cs, Ct, P, BLOCK_P)
    # d rows[b] / d (Y - T) = 2 / (Ct P) (Y - T), times the sample's grad_output: `scale` = 2 / (Ct P)
    col_grad = tl.load(grad_rows_ptr + sample, mask=col_ok, other=0.0).to(tl.float32) * scale
    for o_start in range(0, Ct, BLOCK_O):
        outs = o_start + tl.arange(0, BLOCK_O)
        out_ok = outs < Ct
        err = _projection_error(x_ptr, w_ptr, bias_ptr, t_ptr, x_cols, t_cols, col_ok, o_start, Cs, Ct, P,
                                HAS_BIAS, BLOCK_O, BLOCK_K, BLOCK_P, DOT_IN_FP32)
        err = err * col_grad[None, :]
        if HAS_BIAS:
            tl.atomic_add(grad_bias_ptr + outs, tl.sum(err, 1), mask=out_ok)
        for k_start in range(0, Cs, BLOCK_K):
            ins = k_start + tl.arange(0, BLOCK_K)
            in_ok = ins < Cs
            x_mask = in_ok[:, None] & col_ok[None, :]
            x_offsets = x_cols[None, :] + ins[:, None].to(tl.int64) * P
            x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0)
            w = tl.load(w_ptr + outs[:, None] * Cs + ins[None, :], mask=out_ok[:, None] & in_ok[None, :], other=0.0)
            tl.atomic_add(grad_w_ptr + outs[:, None] * Cs + ins[None, :], mma(err.to(x.dtype), tl.trans(x), DOT_IN_FP32),
                          mask=out_ok[:, None] & in_ok[None, :])
            grad_x = tl.load(grad_x_ptr + x_offsets, mask=x_mask, other=0.0)
            tl.store(grad_x_ptr + x_offsets, grad_x + mma(tl.trans(w), err.to(w.dtype), DOT_IN_FP32), mask=x_mask)


# --- tiles by Triton version, architecture, operand precision and stage, chosen deterministically --------
@dataclass(frozen=True)
class Tiles:
    block_o: int  # output channels per tile
    block_k: int  # input channels per product
    block_p: int  # columns (pixels) per program
    num_warps: int
    num_stages: int


# {first Triton version: {(arch, dot_in_fp32, "fwd" | "bwd"): Tiles}}; each entry compiles without spills
# on that Triton (tests/lib/test_triton_static.py)
TILES = {
    (3, 6): {
        (90, False, "fwd"): Tiles(64, 32, 64, 8, 3),
        (90, False, "bwd"): Tiles(64, 32, 64, 8, 2),
        (90, True, "fwd"): Tiles(64, 16, 64, 8, 2),
        (90, True, "bwd"): Tiles(64, 16, 32, 8, 2),
        (80, False, "fwd"): Tiles(64, 32, 64, 8, 3),
        (80, False, "bwd"): Tiles(64, 32, 64, 8, 2),
        (80, True, "fwd"): Tiles(64, 32, 32, 8, 2),
        (80, True, "bwd"): Tiles(64, 16, 32, 8, 2),
    },
    (3, 8): {
        (90, False, "fwd"): Tiles(128, 64, 64, 8, 3),
        (90, False, "bwd"): Tiles(64, 64, 64, 8, 2),
        (90, True, "fwd"): Tiles(64, 32, 64, 4, 2),
        (90, True, "bwd"): Tiles(64, 16, 32, 8, 2),
        (80, False, "fwd"): Tiles(128, 64, 64, 8, 3),
        (80, False, "bwd"): Tiles(64, 32, 64, 8, 2),
        (80, True, "fwd"): Tiles(64, 32, 64, 8, 2),
        (80, True, "bwd"): Tiles(64, 16, 32, 8, 2),
    },
}
# Triton 3.9 (ptxas 13) as 3.8, but for two forward tiles that spill there
TILES[(3, 9)] = {
    **TILES[(3, 8)],
    (90, False, "fwd"): Tiles(128, 32, 64, 8, 3),
    (80, True, "fwd"): Tiles(64, 16, 64, 8, 2),
}
INSTALLED_TILES = for_installed_triton(TILES)


def _operands(x: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The weight in x's dtype (16-bit activations use a 16-bit copy of the small weight, as autocast's
    conv does), the bias in fp32, the teacher in x's dtype or fp32: the dtypes the static checks cover."""
    if teacher.dtype not in (x.dtype, torch.float32):
        teacher = teacher.float()
    bias32 = bias.float().contiguous() if bias is not None else None
    return teacher, weight.to(x.dtype).contiguous(), bias32, dot_in_fp32(x.dtype)


def _launch(kernel, stage, x, has_bias, in_fp32, *args):
    tiles = INSTALLED_TILES[(device_arch(x.device), in_fp32, stage)]
    b, _, p = x.shape
    grid = (triton.cdiv(b * p, tiles.block_p),)
    kernel[grid](*args, HAS_BIAS=has_bias, BLOCK_O=tiles.block_o, BLOCK_K=tiles.block_k, BLOCK_P=tiles.block_p,
                 DOT_IN_FP32=in_fp32, num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def feature_regression_forward(x: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error [B] fp32 of x [B, Cs, P] projected by weight [Ct, Cs] against teacher [B, Ct, P]."""
    b, cs, p = x.shape
    ct = weight.shape[0]
    teacher, weight, bias32, in_fp32 = _operands(x, teacher, weight, bias)
    col_sq = torch.empty(b * p, device=x.device, dtype=torch.float32)
    _launch(_feature_regression_fwd_kernel, "fwd", x, bias is not None, in_fp32,
            x, weight, bias32 if bias32 is not None else col_sq, teacher, col_sq, b, cs, ct, p)
    return col_sq.view(b, p).sum(1) / (ct * p)


def feature_regression_backward(grad_rows: torch.Tensor, x: torch.Tensor, teacher: torch.Tensor,
                                weight: torch.Tensor, bias: torch.Tensor | None):
    """(grad x [B, Cs, P], grad weight [Ct, Cs], grad bias [Ct] or None), fp32, for grad_rows [B]."""
    b, cs, p = x.shape
    ct = weight.shape[0]
    teacher, weight, bias32, in_fp32 = _operands(x, teacher, weight, bias)
    f32 = dict(device=x.device, dtype=torch.float32)
    grad_x = torch.zeros(b, cs, p, **f32)
    grad_w = torch.zeros(ct, cs, **f32)
    grad_bias = torch.zeros(ct, **f32) if bias is not None else None
    _launch(_feature_regression_bwd_kernel, "bwd", x, bias is not None, in_fp32,
            x, weight, bias32 if bias32 is not None else grad_w, teacher, grad_rows.float().contiguous(), grad_x,
            grad_w, grad_bias if grad_bias is not None else grad_w, b, cs, ct, p, 2.0 / (ct * p))
    return grad_x, grad_w, grad_bias


# --- every configuration the launchers can pick on the installed Triton, for the static checks ----------
def static_configs(tiles_by_key: dict) -> list[StaticConfig]:
    configs = []
    for (arch, in_fp32, stage), tiles in tiles_by_key.items():
        for x_dtype in (("fp32",) if in_fp32 else ("bf16", "fp16")):
            for t_dtype in sorted({x_dtype, "fp32"}):
                for has_bias in (True, False):
                    common = {"x_ptr": f"*{x_dtype}", "w_ptr": f"*{x_dtype}", "bias_ptr": "*fp32",
                              "t_ptr": f"*{t_dtype}", "B": "i32", "Cs": "i32", "Ct": "i32", "P": "i32"}
                    if stage == "fwd":
                        fn, signature = _feature_regression_fwd_kernel, dict(common, col_sq_ptr="*fp32")
                    else:
                        fn, signature = _feature_regression_bwd_kernel, dict(
                            common, grad_rows_ptr="*fp32", grad_x_ptr="*fp32", grad_w_ptr="*fp32",
                            grad_bias_ptr="*fp32", scale="fp32")
                    configs.append(StaticConfig(
                        name=f"feature_regression_{stage}_sm{arch}_{x_dtype}_t{t_dtype}{'_bias' if has_bias else ''}",
                        fn=fn, signature=signature,
                        constexprs={"HAS_BIAS": has_bias, "BLOCK_O": tiles.block_o, "BLOCK_K": tiles.block_k,
                                    "BLOCK_P": tiles.block_p, "DOT_IN_FP32": in_fp32},
                        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                        mma="tf32" if in_fp32 else x_dtype.replace("fp", "f"), expect_wgmma=True,
                        archs=(arch,)))
    return configs


STATIC_CONFIGS = static_configs(INSTALLED_TILES)
