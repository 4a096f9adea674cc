"""Rank-ordered collectives: kept at their old path; the code lives in gdrd_fast/collectives.py, below the
Modules that use it (MemoryQueue(gather=True))."""
from ..collectives import (batch_sizes, ddp_ignore_buffers, gather_rows, gather_rows_with_grad, is_active,  # noqa: F401
                           rank, src_rank, world_size)
