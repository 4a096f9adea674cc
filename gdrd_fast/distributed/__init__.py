"""Multi-process training on torch.distributed with the semantics of one big batch.

comm: rank-ordered gathers (with and without gradient) and the gradient-scaling rule;
memory: ShardedMemoryBank; losses: DistributedCRDLoss, DistributedRelationalContrastiveLoss.
"""
from .comm import gather_rows, gather_rows_with_grad, is_active, rank, world_size
from .losses import DistributedCRDLoss, DistributedRelationalContrastiveLoss, shared_generator
from .memory import ShardedMemoryBank

__all__ = ["DistributedCRDLoss", "DistributedRelationalContrastiveLoss", "ShardedMemoryBank", "gather_rows",
           "gather_rows_with_grad", "is_active", "rank", "world_size", "shared_generator"]
