"""infonce_bank_loss in Triton: one FlashAttention-style pass over the bank, split over the bank.

Pass 1 (_infonce_partial_kernel), grid (query tiles, bank splits): each program streams its share of
bank tiles, keeps an online max and sum of exp2(s * log2(e) / T) per query row and, when gradients are
wanted, the exp-weighted sum of bank rows (dQuery's bank term: the bank plays both key and value).
Pass 2 (_infonce_merge_kernel), grid (query tiles): merges the splits' partials by log-sum-exp, adds
the positive logit, and writes the row losses and the per-row gradients w.r.t. query and positive.
Splitting the bank keeps ~one wave of programs busy even at B=256; nothing of size B x K is stored.
With NEED_RANK, pass 1 also counts, per query row, the bank rows whose logit is strictly above the
positive's (MoCo's acc@k is rank < k); the splits' counts are summed on the host ([splits, B] int32).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._tiles import StaticConfig, device_arch, dot_in_fp32, for_installed_triton, mma

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
_EMPTY_MAX = tl.constexpr(-1.0e30)  # finite "minus infinity": an empty split merges as weight 0 instead of NaN


@triton.jit
def _infonce_partial_kernel(q_ptr, bank_ptr, max_ptr, sum_ptr, acc_ptr, pos_ptr, rank_ptr, B, K, D,
                            tiles_per_split, scale_log2,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            NUM_CHUNKS: tl.constexpr, NEED_GRAD: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                            NEED_RANK: tl.constexpr):
    """Program (query tile, bank split, feature chunk): scores use all NUM_CHUNKS chunks of BLOCK_D
    features; the dQuery accumulator holds only this program's chunk (a full row at D=512 would spill)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    chunk = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    chunk_cols = tl.arange(0, BLOCK_D)
    acc_cols = chunk * BLOCK_D + chunk_cols
    acc_col_ok = acc_cols < D
    q_rows = q_ptr + rows[:, None].to(tl.int64) * D
    if NUM_CHUNKS == 1:
        q = tl.load(q_rows + chunk_cols[None, :], mask=row_ok[:, None] & acc_col_ok[None, :], other=0.0)

    row_max = tl.full([BLOCK_M], _EMPTY_MAX, tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if NEED_RANK:  # the positive's logit, log2 domain, as the scores below
        pos_logit2 = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
        rank = tl.zeros([BLOCK_M], tl.int32)
    first = split * tiles_per_split * BLOCK_N
    last = tl.minimum(first + tiles_per_split * BLOCK_N, K)
    for start in range(first, last, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < K
        k_rows = bank_ptr + keys[:, None].to(tl.int64) * D
        if NUM_CHUNKS == 1:
            k = tl.load(k_rows + chunk_cols[None, :], mask=key_ok[:, None] & acc_col_ok[None, :], other=0.0)
            s = mma(q, tl.trans(k), DOT_IN_FP32)
        else:
            s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for c in tl.static_range(NUM_CHUNKS):
                cols = c * BLOCK_D + chunk_cols
                col_ok = cols < D
                q_c = tl.load(q_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                k_c = tl.load(k_rows + cols[None, :], mask=key_ok[:, None] & col_ok[None, :], other=0.0)
                s += mma(q_c, tl.trans(k_c), DOT_IN_FP32)
            if NEED_GRAD:
                k = tl.load(k_rows + acc_cols[None, :], mask=key_ok[:, None] & acc_col_ok[None, :], other=0.0)
        s = tl.where(key_ok[None, :], s * scale_log2, float("-inf"))
        if NEED_RANK:  # strictly above: a tie counts for the positive; padded keys (-inf) never count
            rank += tl.sum((s > pos_logit2[:, None]).to(tl.int32), 1)
        new_max = tl.maximum(row_max, tl.max(s, 1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, 1)
        if NEED_GRAD:
            acc = acc * rescale[:, None] + mma(p.to(k.dtype), k, DOT_IN_FP32)
        row_max = new_max

    part = split * B + rows
    if chunk == 0:  # every chunk computed the same max and sum
        tl.store(max_ptr + part, row_max, mask=row_ok)
        tl.store(sum_ptr + part, row_sum, mask=row_ok)
        if NEED_RANK:
            tl.store(rank_ptr + part, rank, mask=row_ok)
    if NEED_GRAD:
        tl.store(acc_ptr + part[:, None].to(tl.int64) * D + acc_cols[None, :], acc,
                 mask=row_ok[:, None] & acc_col_ok[None, :])


@triton.jit
def _infonce_merge_kernel(q_ptr, pos_ptr, max_ptr, sum_ptr, acc_ptr, rows_ptr, grad_q_ptr, grad_p_ptr,
                          B, D, n_split, scale_log2, inv_temperature,
                          BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NEED_GRAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < D)[None, :]
    offsets = rows[:, None].to(tl.int64) * D + cols[None, :]
    q = tl.load(q_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    pos_logit2 = tl.sum(q * pos, 1) * scale_log2  # the positive logit, log2 domain

    row_max = pos_logit2
    row_sum = tl.full([BLOCK_B], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for split in range(n_split):
        part = split * B + rows
        m = tl.load(max_ptr + part, mask=row_ok, other=_EMPTY_MAX)
        new_max = tl.maximum(row_max, m)
        old_weight = tl.exp2(row_max - new_max)
        part_weight = tl.exp2(m - new_max)
        row_sum = row_sum * old_weight + tl.load(sum_ptr + part, mask=row_ok, other=0.0) * part_weight
        if NEED_GRAD:
            part_acc = tl.load(acc_ptr + part[:, None].to(tl.int64) * D + cols[None, :], mask=mask, other=0.0)
            acc = acc * old_weight[:, None] + part_acc * part_weight[:, None]
        row_max = new_max

    lse2 = row_max + tl.log2(row_sum)
    tl.store(rows_ptr + rows, (lse2 - pos_logit2) * LN2, mask=row_ok)
    if NEED_GRAD:
        pos_weight_minus_one = (tl.exp2(pos_logit2 - lse2) - 1.0)[:, None]
        grad_q = (acc / row_sum[:, None] + pos_weight_minus_one * pos) * inv_temperature
        tl.store(grad_q_ptr + offsets, grad_q, mask=mask)
        tl.store(grad_p_ptr + offsets, pos_weight_minus_one * q * inv_temperature, mask=mask)


# --- tiles by Triton version, architecture, precision and feature dim, chosen deterministically ---------
def block_d(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


@dataclass(frozen=True)
class Tiles:
    """Tiles of the partial kernel. block_d < the padded feature dim splits the dQuery accumulator over
    feature chunks."""
    block_d: int
    block_m: int  # query rows per program
    block_n: int  # bank rows per step
    num_warps: int
    num_stages: int


# {first Triton version: {(arch, dot_in_fp32, padded feature dim): Tiles}}. Each entry is the largest tile
# ptxas compiles without spills on that architecture and Triton (tests/lib/test_triton_static.py); fp32 runs as
# tf32x3, three MMAs per tile, which stops at D = 128.
TILES = {
    (3, 6): {
        (90, False, 32): Tiles(32, 64, 128, 4, 3),
        (90, False, 64): Tiles(64, 64, 128, 4, 3),
        (90, False, 128): Tiles(128, 128, 64, 8, 3),
        (90, False, 256): Tiles(256, 64, 32, 8, 2),
        (90, False, 512): Tiles(256, 64, 32, 8, 2),
        (90, True, 32): Tiles(32, 64, 64, 4, 3),
        (90, True, 64): Tiles(64, 64, 64, 4, 3),
        (90, True, 128): Tiles(64, 64, 32, 4, 2),
        (80, False, 32): Tiles(32, 64, 64, 4, 3),
        (80, False, 64): Tiles(64, 64, 64, 4, 3),
        (80, False, 128): Tiles(128, 64, 64, 8, 3),
        (80, False, 256): Tiles(256, 64, 32, 8, 2),
        (80, False, 512): Tiles(256, 64, 32, 8, 2),
        (80, True, 32): Tiles(32, 64, 32, 4, 3),
        (80, True, 64): Tiles(64, 32, 32, 4, 2),
        (80, True, 128): Tiles(64, 64, 32, 4, 2),
    },
}
# Triton 3.9 (ptxas 13 on sm_90) as 3.6, but for the sm_90 tiles that spill there (the half-precision ones
# up to D = 128 spill with the rank counter at 3.6's bank step)
TILES[(3, 9)] = {
    **TILES[(3, 6)],
    (90, False, 32): Tiles(32, 64, 64, 4, 3),
    (90, False, 64): Tiles(64, 64, 64, 4, 3),
    (90, False, 128): Tiles(128, 128, 32, 8, 3),
    (90, False, 256): Tiles(128, 64, 32, 8, 2),
    (90, False, 512): Tiles(128, 64, 16, 8, 2),
    (90, True, 32): Tiles(32, 64, 32, 4, 3),
    (90, True, 64): Tiles(64, 64, 32, 4, 2),
}
INSTALLED_TILES = for_installed_triton(TILES)


def max_d(*dtypes: torch.dtype) -> int:
    """The widest feature dim the installed tile table covers for inputs stored in `dtypes`."""
    return max(key[2] for key in INSTALLED_TILES if key[1] == dot_in_fp32(*dtypes))


def supports(d: int, *dtypes: torch.dtype) -> bool:
    """Whether infonce_bank_forward takes inputs of feature dim d stored in `dtypes`: float64 needs an
    exact path, and a feature dim past the table's (fp32 stops at 128) has no spill-free tile."""
    if torch.float64 in dtypes:
        return False
    return any(key[1:] == (dot_in_fp32(*dtypes), block_d(d)) for key in INSTALLED_TILES)


def merge_config(d_block: int) -> dict:
    return {"BLOCK_B": max(1, 2048 // d_block), "num_warps": 4}


@functools.lru_cache(None)
def _target_programs(device: torch.device) -> int:
    """Programs of pass 1 that fill the device: one wave on a GPU, a handful in the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def split_plan(b: int, k: int, block_m: int, block_n: int, programs: int) -> tuple[int, int]:
    """(bank splits, bank tiles per split): enough splits to fill `programs`, none of them empty."""
    n_tiles = max(1, triton.cdiv(k, block_n))
    n_split = min(n_tiles, max(1, triton.cdiv(programs, triton.cdiv(b, block_m))))
    tiles_per_split = triton.cdiv(n_tiles, n_split)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def infonce_bank_forward(query: torch.Tensor, positive: torch.Tensor, bank: torch.Tensor, temperature: float,
                         need_grad: bool, need_rank: bool = False, *, programs: int | None = None,
                         tiles: Tiles | None = None):
    """(row losses [B] fp32, d row_b / d query_b [B, D] fp32, d row_b / d positive_b, rank [B] int64), unscaled.

    rank[b] (empty unless need_rank) = bank rows whose logit is strictly above the positive's.

    For inputs that `supports` accepts. `programs` (pass-1 programs to aim for) and `tiles` default to the
    device's plan; tests set them to force several splits and ragged tiles on small inputs.
    """
    b, d = query.shape
    k = bank.shape[0]
    if not supports(d, query.dtype, bank.dtype):
        raise ValueError(f"infonce_bank_forward: no kernel for {query.dtype} query / {bank.dtype} bank of "
                         f"feature dim {d} (supports() says which inputs run)")
    in_fp32 = dot_in_fp32(query.dtype, bank.dtype)
    if len({query.dtype, positive.dtype, bank.dtype}) > 1:  # mixed dtypes run in fp32, as the static checks cover
        query, positive, bank = query.float(), positive.float(), bank.float()
    query, positive, bank = query.contiguous(), positive.contiguous(), bank.contiguous()
    d_block = block_d(d)
    tiles = tiles or INSTALLED_TILES[(device_arch(query.device), in_fp32, d_block)]
    n_split, tiles_per_split = split_plan(b, k, tiles.block_m, tiles.block_n,
                                          programs or _target_programs(query.device))
    num_chunks = d_block // tiles.block_d
    f32 = dict(device=query.device, dtype=torch.float32)
    part_max = torch.empty(n_split, b, **f32)
    part_sum = torch.empty(n_split, b, **f32)
    part_acc = torch.empty(n_split, b, d, **f32) if need_grad else part_sum
    scale_log2 = LOG2E / temperature
    if need_rank:  # the positive logit as the merge computes it: fp32 products of the stored inputs
        pos_logit2 = (query.float() * positive.float()).sum(1) * scale_log2
        part_rank = torch.empty(n_split, b, device=query.device, dtype=torch.int32)
    else:  # never read
        pos_logit2, part_rank = part_sum, torch.empty(0, device=query.device, dtype=torch.int32)
    _infonce_partial_kernel[(triton.cdiv(b, tiles.block_m), n_split, num_chunks if need_grad else 1)](
        query, bank, part_max, part_sum, part_acc, pos_logit2, part_rank, b, k, d, tiles_per_split, scale_log2,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_D=tiles.block_d, NUM_CHUNKS=num_chunks,
        NEED_GRAD=need_grad, DOT_IN_FP32=in_fp32, NEED_RANK=need_rank, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)

    rows = torch.empty(b, **f32)
    grad_q = torch.empty(b, d, **f32) if need_grad else rows.new_empty(0)
    grad_p = torch.empty(b, d, **f32) if need_grad else rows.new_empty(0)
    merge = merge_config(d_block)
    _infonce_merge_kernel[(triton.cdiv(b, merge["BLOCK_B"]),)](
        query, positive, part_max, part_sum, part_acc, rows, grad_q, grad_p, b, d, n_split, scale_log2,
        1.0 / temperature, BLOCK_B=merge["BLOCK_B"], BLOCK_D=d_block, NEED_GRAD=need_grad,
        num_warps=merge["num_warps"])
    rank = part_rank.sum(0, dtype=torch.int64) if need_rank else rows.new_empty(0, dtype=torch.int64)
    return rows, grad_q, grad_p, rank


# --- every configuration infonce_bank_forward can launch on the installed Triton, for the static checks --
def static_configs(tiles_by_key: dict) -> list[StaticConfig]:
    configs = []
    for (arch, in_fp32, d_block), tiles in tiles_by_key.items():
        for dtype in (("fp32",) if in_fp32 else ("bf16", "fp16")):
            # the rank counter rides on the training launch (MoCo's meters); its registers are one int per row
            for need_grad, need_rank in ((True, False), (False, False), (True, True)):
                configs.append(StaticConfig(
                    name=f"infonce_partial_sm{arch}_{dtype}_D{d_block}_{'grad' if need_grad else 'nograd'}"
                         f"{'_rank' if need_rank else ''}",
                    fn=_infonce_partial_kernel,
                    signature={"q_ptr": f"*{dtype}", "bank_ptr": f"*{dtype}", "max_ptr": "*fp32",
                               "sum_ptr": "*fp32", "acc_ptr": "*fp32", "pos_ptr": "*fp32", "rank_ptr": "*i32",
                               "B": "i32", "K": "i32", "D": "i32", "tiles_per_split": "i32", "scale_log2": "fp32"},
                    constexprs={"BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n, "BLOCK_D": tiles.block_d,
                                "NUM_CHUNKS": d_block // tiles.block_d, "NEED_GRAD": need_grad,
                                "DOT_IN_FP32": in_fp32, "NEED_RANK": need_rank},
                    num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                    mma="tf32" if in_fp32 else dtype.replace("fp", "f"), expect_wgmma=True,
                    archs=(arch,)))
    return configs


def merge_static_configs() -> list[StaticConfig]:
    configs = []
    for d_block in sorted({d for (_, _, d) in INSTALLED_TILES}):
        merge = merge_config(d_block)
        for dtype in ("bf16", "fp16", "fp32"):
            for need_grad in (True, False):
                configs.append(StaticConfig(
                    name=f"infonce_merge_{dtype}_D{d_block}_{'grad' if need_grad else 'nograd'}",
                    fn=_infonce_merge_kernel,
                    signature={"q_ptr": f"*{dtype}", "pos_ptr": f"*{dtype}", "max_ptr": "*fp32",
                               "sum_ptr": "*fp32", "acc_ptr": "*fp32", "rows_ptr": "*fp32",
                               "grad_q_ptr": "*fp32", "grad_p_ptr": "*fp32", "B": "i32", "D": "i32",
                               "n_split": "i32", "scale_log2": "fp32", "inv_temperature": "fp32"},
                    constexprs={"BLOCK_B": merge["BLOCK_B"], "BLOCK_D": d_block, "NEED_GRAD": need_grad},
                    num_warps=merge["num_warps"], num_stages=3, mma=None, expect_wgmma=False))
    return configs


STATIC_CONFIGS = static_configs(INSTALLED_TILES) + merge_static_configs()
