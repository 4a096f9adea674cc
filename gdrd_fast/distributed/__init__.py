"""Multi-process training on torch.distributed with the semantics of one big batch.

comm: rank-ordered gathers (with and without gradient) and the gradient-scaling rule;
memory: ShardedMemoryBank; losses: DistributedCRDLoss, DistributedRelationalContrastiveLoss;
launch: torchrun's environment -> process group, loss conversion, DDP wrap (used by gdrd_fast.train).
"""
from .comm import gather_rows, gather_rows_with_grad, is_active, rank, world_size
from .launch import init_from_env, launched_by_torchrun, to_distributed, wrap_ddp
from .losses import DistributedCRDLoss, DistributedRelationalContrastiveLoss, shared_generator
from .memory import ShardedMemoryBank

__all__ = ["DistributedCRDLoss", "DistributedRelationalContrastiveLoss", "ShardedMemoryBank", "gather_rows",
           "gather_rows_with_grad", "is_active", "rank", "world_size", "shared_generator", "init_from_env",
           "launched_by_torchrun", "to_distributed", "wrap_ddp"]
