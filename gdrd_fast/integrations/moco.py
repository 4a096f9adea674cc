"""MoCo (facebookresearch/moco) on gdrd_fast's fused InfoNCE, its training script otherwise unchanged.

    import gdrd_fast.integrations.moco
    criterion = gdrd_fast.integrations.moco.fuse(model)  # was: criterion = nn.CrossEntropyLoss().cuda(args.gpu)

fuse(model) turns a built MoCo model (moco/builder.py's MoCo, bare or inside DistributedDataParallel) into
one whose forward never builds the B x (1+K) logits: it returns (MoCoOutput(loss, rank), target), where
rank[b] counts the queue rows scoring strictly above row b's key. The returned criterion reads the loss;
main_moco.py's own accuracy(output, target, topk=(1, 5)) reads MoCoOutput.topk, which answers from rank,
so the Acc@1/Acc@5 meters mean what they meant (a tie between the key and a queue row counts for the key).
The queue becomes a gdrd_fast.MemoryQueue holding MoCo's rows and pointer (gather=True: every rank's keys,
in rank order, as concat_all_gather); checkpoints keep working both ways (see _load_moco_queue).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import infonce_bank_loss
from ..memory import MemoryQueue

__all__ = ["MoCoCriterion", "MoCoOutput", "fuse", "moco_queue", "topk_accuracy"]


def moco_queue(dim: int, size: int, *, generator: torch.Generator | None = None, gather: bool = True,
               device=None) -> MemoryQueue:
    """A full MemoryQueue that starts as MoCo's: normalize(randn(dim, K), dim=0), drawn in that shape from
    `generator` (default: torch's global one, as MoCo draws it), stored row-major as [K, dim]."""
    queue = MemoryQueue(size, dim, gather=gather).to(device)
    start = F.normalize(torch.randn(dim, size, generator=generator, device=device), dim=0)
    with torch.no_grad():
        queue.values.copy_(start.t())
        queue.count.fill_(size)
    return queue


def topk_accuracy(rank: Tensor, topk=(1,)) -> list[Tensor]:
    """MoCo's accuracy(): per k, the percentage of rows whose key is among the k best of 1+K ([1] tensors)."""
    return [(rank < k).float().mean(0, keepdim=True) * 100.0 for k in topk]


class MoCoOutput(NamedTuple):
    """What the fused forward returns in place of the logits: the mean loss and each row's rank. A
    NamedTuple, so DistributedDataParallel finds the loss among the outputs."""
    loss: Tensor
    rank: Tensor

    def topk(self, k: int, dim: int = 1, largest: bool = True, sorted: bool = True) -> tuple[Tensor, Tensor]:
        """The logits' topk as accuracy() uses it: column 0 (the key) sits at its rank when that is < k;
        every other slot holds -1, a queue row gdrd_fast does not identify. The values are NaN (unknown)."""
        if dim not in (1, -1) or not largest or not sorted:
            raise ValueError("MoCoOutput.topk answers topk(k, 1, True, True) only, as MoCo's accuracy() calls it")
        slots = torch.arange(k, device=self.rank.device)
        pred = torch.where(slots[None, :] == self.rank[:, None], 0, -1)
        return torch.full(pred.shape, float("nan"), device=pred.device), pred


class MoCoCriterion(nn.Module):
    """Stands in for nn.CrossEntropyLoss: the fused forward already computed the loss."""

    def forward(self, output: MoCoOutput, target: Tensor) -> Tensor:
        if not isinstance(output, MoCoOutput):
            raise TypeError(f"output must be the fused MoCo model's MoCoOutput, got {type(output).__name__}: "
                            "was the model passed to gdrd_fast.integrations.moco.fuse?")
        return output.loss


class _FusedMoCo:
    """Mixed in before MoCo's class: forward as MoCo's, with the fused loss instead of the logits."""

    def forward(self, im_q, im_k):
        query = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():  # the key side, step for step as MoCo's forward
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle_ddp(im_k)
            key = F.normalize(self.encoder_k(im_k), dim=1)
            key = self._batch_unshuffle_ddp(key, idx_unshuffle)
        loss, rank = infonce_bank_loss(query, key, self.moco_queue.filled(), temperature=self.T, return_rank=True)
        self.moco_queue.push_(key)  # after scoring, as MoCo dequeues and enqueues
        return MoCoOutput(loss, rank), torch.zeros_like(rank)


def _load_moco_queue(module, state, prefix, *args) -> None:
    """A checkpoint of the unfused model (queue [dim, K], queue_ptr [1]) loads into the fused one."""
    if prefix + "queue" in state and prefix + "moco_queue.values" not in state:
        state[prefix + "moco_queue.values"] = state.pop(prefix + "queue").t().contiguous()
        state[prefix + "moco_queue.ptr"] = state.pop(prefix + "queue_ptr").reshape(())
        state[prefix + "moco_queue.count"] = torch.tensor(module.moco_queue.size)


def fuse(model: nn.Module) -> MoCoCriterion:
    """Switch a built MoCo model (or the DistributedDataParallel around it) to the fused loss in place;
    returns the criterion to use instead of nn.CrossEntropyLoss. Its queue is carried over unchanged."""
    moco = getattr(model, "module", model)
    missing = [name for name in ("queue", "queue_ptr", "T", "encoder_q", "encoder_k") if not hasattr(moco, name)]
    if missing:
        raise TypeError(f"fuse(model): model has no {', '.join(missing)}; expected moco/builder.py's MoCo")
    dim, size = moco.queue.shape
    queue = MemoryQueue(size, dim, dtype=moco.queue.dtype, gather=True).to(moco.queue.device)
    with torch.no_grad():
        queue.values.copy_(moco.queue.t())
        queue.ptr.copy_(moco.queue_ptr.reshape(()))
        queue.count.fill_(size)
    del moco.queue, moco.queue_ptr  # the buffers' rows now live in moco_queue, row-major
    moco.moco_queue = queue
    moco.__class__ = type(f"Fused{type(moco).__name__}", (_FusedMoCo, type(moco)), {})
    moco._register_load_state_dict_pre_hook(_load_moco_queue, with_module=True)
    return MoCoCriterion()
