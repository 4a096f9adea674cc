"""torchrun integration: the process group from torchrun's environment, and the DDP wrap of a stage.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every process it starts;
a process that finds them joins the group (NCCL on GPUs, one GPU per process = cuda:LOCAL_RANK; gloo
on CPU). Without them everything runs as one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..losses import CRDLoss, RelationalContrastiveLoss
from .losses import DistributedCRDLoss, DistributedRelationalContrastiveLoss

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def init_from_env(device: torch.device) -> tuple[torch.device, int, int]:
    """(device, rank, world_size); joins the default process group when started by torchrun."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")  # env:// from torchrun
    return device, dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Leave the process group cleanly: a barrier first, so no rank tears gloo down under a peer's
    last collective (which aborts the process at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def to_distributed(loss: nn.Module, group=None, sharded: bool = False) -> nn.Module:
    """The Distributed twin of a CRDLoss or RelationalContrastiveLoss, with its state; sharded=True splits
    CRD's banks over the ranks (ShardedMemoryBank: each rank keeps its slice of the loaded rows)."""
    if isinstance(loss, (DistributedCRDLoss, DistributedRelationalContrastiveLoss)):
        return loss
    with torch.random.fork_rng(devices=[]):  # the twin's random init is overwritten: draw nothing
        twin = _twin(loss, group, sharded)
    twin.load_state_dict(loss.state_dict(), assign=True)  # the tensors themselves: same device and dtypes
    twin.generator = loss.generator
    return twin.train(loss.training)


def _twin(loss: nn.Module, group, sharded: bool) -> nn.Module:
    if isinstance(loss, CRDLoss):
        embed_s, embed_t = loss.embed_s.linear, loss.embed_t.linear
        return DistributedCRDLoss(embed_s.in_features, embed_t.in_features, loss.n_data, embed_s.out_features,
                                  loss.nce_k, loss.nce_t, loss.memory_s.momentum,
                                  bank_dtype=loss.memory_s.rows.dtype, sharded=sharded, group=group,
                                  backend=loss.backend)
    if isinstance(loss, RelationalContrastiveLoss):
        rel_dim, embed_dim = loss.rel_dim, loss.embed_dim
        return DistributedRelationalContrastiveLoss(
            embed_dim, rel_dim, loss.num_negatives, loss.queue_t.size, loss.temperature, n_data=loss.n_data,
            supervised=loss.supervised, backend=loss.backend, group=group)
    raise TypeError(f"no distributed form of {type(loss).__name__}: expected CRDLoss or "
                    "RelationalContrastiveLoss")


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` as SyncBatchNorm (statistics over the global batch; same state_dict
    keys, so checkpoints stay interchangeable). torch runs SyncBatchNorm on GPUs only."""
    if device.type != "cuda":
        raise ValueError(f"sync_batchnorm needs CUDA devices (torch's SyncBatchNorm does not run on {device.type}); "
                         "set sync_batchnorm: false")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def wrap_ddp(module: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around `module`, skipping the buffers that distributed losses keep identical themselves."""
    module._ddp_params_and_buffers_to_ignore = [
        f"{prefix}.{name}" if prefix else name
        for prefix, sub in module.named_modules() if sub is not module
        for name in getattr(sub, "_ddp_params_and_buffers_to_ignore", ())]
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
