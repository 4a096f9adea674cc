"""pytorch-metric-learning's CrossBatchMemory(NTXentLoss, miner) on gdrd_fast's infonce_bank_loss.

CrossBatchMemory enqueues rows before scoring. Without enqueue_mask the whole batch is enqueued and
scored, so the batch's other rows are candidates too (the anchor's own slot excepted); with it, the
masked rows are only enqueued (MoCo's keys) and the others only scored. Each memory row of the anchor's
label is a positive pair, every other row a negative; scores are cosine similarities over T; each pair
costs -log(p + tiny), p its softmax probability against the anchor's negatives and tiny the smallest
normal number of the embeddings' dtype (PML's floor); the loss is the mean over pairs, in that dtype.

Two paths, the same loss:
- fused: all pairs in float32/float64, one infonce_bank_loss call that never builds the pair lists (the
  floor acts only past a pair loss of 87 in float32, beyond 2/T + log(memory_size) at any usual T);
- exact: a miner, an indices_tuple, or float16/bfloat16 (whose floor, 6.1e-5 in float16, caps a pair's
  loss at 9.7 and so changes the loss) score the listed pairs from one B x memory_size matrix in float32,
  as PML does, and apply the floor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import infonce_bank_loss
from ..memory import MemoryQueue
from ..numerics import compute_dtype

__all__ = ["CrossBatchNTXentLoss"]

_FUSED_DTYPES = (torch.float32, torch.float64)


class CrossBatchNTXentLoss(nn.Module):
    """forward(embeddings [B, embedding_size], labels [B], indices_tuple=None, enqueue_mask=None) -> scalar
    in the embeddings' dtype. The memory is a labelled MemoryQueue that, like CrossBatchMemory's, takes
    the embeddings' dtype and device on use; embedding_memory, label_memory, queue_idx, has_been_filled
    and curr_batch_idx read it as CrossBatchMemory's attributes (views of its buffers, not copies)."""

    def __init__(self, embedding_size: int, memory_size: int = 1024, temperature: float = 0.07,
                 miner=None, backend: str = "auto"):
        super().__init__()
        self.embedding_size, self.temperature, self.miner, self.backend = embedding_size, temperature, miner, backend
        self.memory = MemoryQueue(memory_size, embedding_size, with_labels=True)
        self.curr_batch_idx = torch.zeros(0, dtype=torch.long)

    # --- CrossBatchMemory's state, read from the queue ---------------------------------------------------
    @property
    def memory_size(self) -> int:
        return self.memory.size

    @property
    def embedding_memory(self) -> Tensor:
        return self.memory.values

    @property
    def label_memory(self) -> Tensor:
        return self.memory.labels

    @property
    def queue_idx(self) -> int:
        return int(self.memory.ptr)

    @property
    def has_been_filled(self) -> bool:
        return self.memory.is_full()

    def reset_queue(self) -> None:
        """Empty the memory (CrossBatchMemory.reset_queue); earlier views keep the old rows."""
        values = self.memory.values
        self.memory = MemoryQueue(self.memory_size, self.embedding_size, with_labels=True,
                                  dtype=values.dtype).to(values.device)
        self.curr_batch_idx = torch.zeros(0, dtype=torch.long, device=values.device)

    # --- the loss ----------------------------------------------------------------------------------------
    def forward(self, embeddings: Tensor, labels: Tensor, indices_tuple=None, enqueue_mask: Tensor | None = None):
        anchors, anchor_labels, keys, key_labels = self._split(embeddings, labels, indices_tuple, enqueue_mask)
        values = self.memory.values
        if values.device != embeddings.device or values.dtype != embeddings.dtype:
            self.memory.to(device=embeddings.device, dtype=embeddings.dtype)
        start = self.memory.ptr.clone()  # a tensor: int() would wait for the device
        if keys.shape[0]:  # enqueued first, as CrossBatchMemory does
            self.memory.push_(keys.detach(), key_labels)
        self.curr_batch_idx = (torch.arange(keys.shape[0], device=labels.device) + start.to(labels.device)) \
            % self.memory_size
        self_slots = self.curr_batch_idx if enqueue_mask is None else None
        exact = self.miner is not None or indices_tuple is not None or embeddings.dtype not in _FUSED_DTYPES
        if anchors.shape[0] == 0 or self.memory.num_filled() == 0:  # nothing scored: PML's zero loss
            loss = embeddings.sum() * 0
        elif exact:
            loss = self._exact(anchors, anchor_labels, self_slots, indices_tuple)
        elif self_slots is None:  # scored against the memory only: the anchors are not in it
            loss = infonce_bank_loss(anchors, None, self.memory.filled(), normalize=True, labels=anchor_labels,
                                     bank_labels=self.memory.filled_labels(), temperature=self.temperature,
                                     backend=self.backend)
        else:
            batch = keys.shape[0]
            loss = infonce_bank_loss(anchors, None, self.memory.filled(skip_newest=batch),
                                     batch_negatives=anchors.detach(), normalize=True, labels=anchor_labels,
                                     bank_labels=self.memory.filled_labels(skip_newest=batch),
                                     temperature=self.temperature, backend=self.backend)
        return loss.to(embeddings.dtype)

    def _split(self, embeddings, labels, indices_tuple, enqueue_mask):
        """(anchors, their labels, rows to enqueue, their labels), checked before anything changes."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [B, {self.embedding_size}], got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be [{embeddings.shape[0]}], got {tuple(labels.shape)}")
        labels = labels.to(embeddings.device)
        if indices_tuple is not None and enqueue_mask is not None:
            raise ValueError("indices_tuple and enqueue_mask are mutually exclusive (as in CrossBatchMemory)")
        if indices_tuple is not None and len(indices_tuple) not in (3, 4):
            raise ValueError(f"indices_tuple must be (anchor, positive, negative) or (anchor, positive, anchor, "
                             f"negative) index tensors, got {len(indices_tuple)} of them")
        if enqueue_mask is None:
            keys, key_labels = embeddings, labels
            anchors, anchor_labels = embeddings, labels
        else:
            enqueue_mask = enqueue_mask.to(embeddings.device)
            if enqueue_mask.dtype != torch.bool or enqueue_mask.shape != labels.shape:
                raise ValueError(f"enqueue_mask must be a bool tensor of shape [{labels.shape[0]}], got "
                                 f"{enqueue_mask.dtype} {tuple(enqueue_mask.shape)}")
            keys, key_labels = embeddings[enqueue_mask], labels[enqueue_mask]
            anchors, anchor_labels = embeddings[~enqueue_mask], labels[~enqueue_mask]
        if keys.shape[0] > self.memory_size:
            raise ValueError(f"{keys.shape[0]} rows to enqueue, more than memory_size={self.memory_size}")
        return anchors, anchor_labels, keys, key_labels

    def _pairs(self, anchors, anchor_labels, self_slots, indices_tuple):
        """(a1, p, a2, n) into the memory: the miner's tuple (or all pairs), self-comparisons dropped,
        then the caller's indices_tuple appended, as CrossBatchMemory builds them."""
        memory, memory_labels = self.memory.filled(), self.memory.filled_labels()
        if self.miner is not None:
            pairs = self.miner(anchors, anchor_labels, memory, memory_labels)
        else:
            same = anchor_labels[:, None] == memory_labels[None]
            pairs = (*torch.where(same), *torch.where(~same))
        if self_slots is not None:  # the anchor against its own slot (in triplets: the whole triplet)
            keep = pairs[1] != self_slots[pairs[0]]
            pairs = (pairs[0][keep], pairs[1][keep], *pairs[2:]) if len(pairs) == 4 else tuple(t[keep] for t in pairs)
        if indices_tuple is not None:
            given = tuple(t.to(anchors.device) for t in indices_tuple)
            if len(pairs) == 3 and len(given) == 4:
                raise ValueError("a triplet miner with a pair indices_tuple: pass triplets (a, p, n) instead")
            if len(pairs) == 4 and len(given) == 3:
                given = (given[0], given[1], given[0], given[2])
            pairs = tuple(torch.cat([mine, theirs]) for mine, theirs in zip(pairs, given))
        return pairs if len(pairs) == 4 else (pairs[0], pairs[1], pairs[0], pairs[2])

    def _exact(self, anchors, anchor_labels, self_slots, indices_tuple) -> Tensor:
        a1, p, a2, n = self._pairs(anchors, anchor_labels, self_slots, indices_tuple)
        dt = compute_dtype(anchors)
        if len(a1) == 0 or len(a2) == 0:  # nothing to contrast: PML's zero loss, still attached to the graph
            return anchors.sum().to(dt) * 0
        q = F.normalize(anchors.to(dt), dim=1)
        scores = q @ F.normalize(self.memory.filled().detach().to(dt), dim=1).t() / self.temperature
        pos, neg = scores[a1, p], scores[a2, n]
        # each anchor's negatives, log-sum-exp'd per anchor (with their multiplicity, as PML counts them)
        top = torch.full((q.shape[0],), -torch.inf, dtype=dt, device=q.device).scatter_reduce(
            0, a2, neg.detach(), "amax")
        total = torch.zeros_like(top).index_add(0, a2, torch.exp(neg - top[a2]))
        lse = top + torch.log(total)  # -inf for an anchor without negatives
        nll = torch.logaddexp(pos, lse[a1]) - pos
        tiny = torch.finfo(anchors.dtype).tiny  # PML's floor: -log(p + tiny)
        return -torch.logaddexp(-nll, torch.tensor(tiny, dtype=dt, device=q.device).log()).mean()
