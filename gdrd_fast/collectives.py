"""Collectives over the ranks of a process group, in rank order, for batches of uneven size.

Without an initialised process group (or with one rank) every helper is the identity, so code written
for torchrun runs unchanged in one process.

Gradient rule (pytorch-metric-learning#363): DistributedDataParallel AVERAGES parameter gradients over
the W ranks. A loss equals one process fed the concatenated global batch when
  (1) the mean over ranks of the per-rank losses equals the global-batch loss, and
  (2) the backward of every gather that carries gradient SUMS the gradients of all ranks
      (gather_rows_with_grad), so each rank's samples receive the gradient of every rank's loss.
Two ways satisfy (1): every rank computes the whole global loss L (DistributedRelationalContrastiveLoss),
or each rank computes its own rows and scales their sum by W / G, G the global batch size
(DistributedCRDLoss; for equal local batches this is the local mean).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_active(group=None) -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_active(group) else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if is_active(group) else 0


def src_rank(group=None) -> int:
    """Global rank of the group's rank 0 (what broadcast's src wants)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def batch_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's local batch size, in rank order (one small all_gather; it syncs with the host)."""
    if not is_active(group):
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def gather_rows(x: Tensor, sizes: list[int], group=None) -> Tensor:
    """Concatenation of every rank's x (dim 0 = sizes[r] rows on rank r), rank order, no gradient."""
    if not is_active(group):
        return x
    longest = max(sizes)
    x = x.detach().contiguous()
    if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    pieces = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(pieces, x, group=group)
    return torch.cat([p[:n] for p, n in zip(pieces, sizes)])


class _GatherRowsWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.offset = sum(sizes[:rank(group)])
        return gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # sum over ranks (rule 2); all_reduce works on every backend, reduce_scatter not on gloo
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        n = ctx.sizes[rank(ctx.group)]
        return grad[ctx.offset:ctx.offset + n], None, None


def gather_rows_with_grad(x: Tensor, sizes: list[int], group=None) -> Tensor:
    """gather_rows whose backward gives each rank's rows the SUM over ranks of their gradients."""
    if not is_active(group):
        return x
    return _GatherRowsWithGrad.apply(x, sizes, group)


def ddp_ignore_buffers(module: torch.nn.Module) -> None:
    """Keep DistributedDataParallel from broadcasting this module's buffers (banks, queues) each step.

    They are kept identical by construction; rank 0's copy sent every forward would cost N x D bytes
    and would overwrite a sharded bank's other shards. Applies when `module` itself is wrapped in DDP.
    """
    module._ddp_params_and_buffers_to_ignore = [name for name, _ in module.named_buffers()]
