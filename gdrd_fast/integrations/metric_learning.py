"""pytorch-metric-learning's CrossBatchMemory(NTXentLoss) on gdrd_fast's infonce_bank_loss.

CrossBatchMemory enqueues the batch before scoring, so the batch's other rows are candidates too; each
reference row of the anchor's label (queue or batch, the anchor's own slot excepted) is a positive pair,
every other row a negative; scores are cosine similarities over T; the loss is the mean over all
positive pairs. No miner, indices_tuple or enqueue_mask (use pytorch-metric-learning for those).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..functional import infonce_bank_loss
from ..memory import MemoryQueue

__all__ = ["CrossBatchNTXentLoss"]


class CrossBatchNTXentLoss(nn.Module):
    """forward(embeddings [B, embedding_size], labels [B]) -> scalar; the memory is a labelled MemoryQueue
    that, like CrossBatchMemory's, takes the embeddings' dtype and device on use."""

    def __init__(self, embedding_size: int, memory_size: int = 1024, temperature: float = 0.07,
                 backend: str = "auto"):
        super().__init__()
        self.memory = MemoryQueue(memory_size, embedding_size, with_labels=True)
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        batch = embeddings.shape[0]
        if batch > self.memory.size:
            raise ValueError(f"embeddings has {batch} rows, more than memory_size={self.memory.size}")
        values = self.memory.values
        if values.device != embeddings.device or values.dtype != embeddings.dtype:
            self.memory.to(device=embeddings.device, dtype=embeddings.dtype)
        self.memory.push_(embeddings.detach(), labels)  # enqueued first, as CrossBatchMemory does
        return infonce_bank_loss(embeddings, None, self.memory.filled(skip_newest=batch),
                                 batch_negatives=embeddings.detach(), normalize=True, labels=labels,
                                 bank_labels=self.memory.filled_labels(skip_newest=batch),
                                 temperature=self.temperature, backend=self.backend)
