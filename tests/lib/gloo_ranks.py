"""Spawned gloo ranks for the CPU multi-process tests: every rank runs its work over a file store, saves
what it returns, and leaves without tearing gloo down.

Why no teardown: CI twice saw one rank abort with SIGABRT ("terminate called without an active
exception", torch 2.14.1) after its work was done, once in each rank. These tests check the collectives
and their results; the library's own teardown (gdrd_fast.distributed.launch.shutdown) runs in the
torchrun trainer test. After a barrier, the ranks meet once more through files, not sockets, so no
socket is in use when every rank leaves with os._exit(0).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LEAVE_TIMEOUT_S = 120.0


def run_ranks(work, args: tuple, world: int, out_dir) -> list:
    """work(rank, *args) on each of `world` spawned gloo ranks; their results, in rank order."""
    out_dir = Path(out_dir)
    mp.spawn(_rank_main, args=(work, args, world, str(out_dir)), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _rank_main(rank, work, args, world, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    try:
        result = work(rank, *args)
    except BaseException:
        dist.destroy_process_group()  # no barrier: the peer may never reach it
        raise
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # every rank's collectives are complete
    Path(out_dir, f"left{rank}").touch()
    deadline = time.monotonic() + LEAVE_TIMEOUT_S
    while not all(Path(out_dir, f"left{r}").exists() for r in range(world)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: a peer never got past the final barrier")
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
