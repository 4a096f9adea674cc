"""The training loop: deterministic batches, SGD or AdamW per parameter group + step decay, AMP, progress bar, log file, checkpoints.

Every random draw (flips, negatives) comes from RNGs the checkpoint saves, and batch order is a pure
function of (seed, step), so N steps equal N/2 steps + resume + N/2 steps bit for bit on CPU.
Under torchrun, batch_size is the global batch: rank r takes the r-th slice of each step's batch (and
of its flips), DistributedDataParallel averages the gradients, and only rank 0 logs and saves.
"""
from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ..distributed.launch import sync_batchnorm as to_sync_batchnorm, to_distributed, wrap_ddp
from ..distributed.memory import ShardedMemoryBank
from . import checkpoint as ckpt, signals
from .config import OptimConfig, OptimizerConfig
from .runtime import Runtime
from .stages import Stage, Views
from .teacher_cache import TeacherCache, pick_flip

LOG_FORMAT = "%(asctime)s %(message)s"


class StepBatchSampler(Sampler[list[int]]):
    """Batches for steps [start, stop): epoch e is a permutation seeded by (seed, e); last partial batch dropped.

    With world_size > 1 it is the distributed sampler: every rank draws the same global batch of
    batch_size dataset indices and yields its own contiguous slice, so the ranks' batches concatenated
    in rank order are exactly one process's batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} exceeds the dataset size {n}")
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the "
                             f"world size {world_size}")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.steps_per_epoch = n // batch_size
        local = batch_size // world_size
        self.rank_slice = slice(rank * local, (rank + 1) * local)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        order, epoch = None, None
        for step in range(self.start, self.stop):
            e, pos = divmod(step, self.steps_per_epoch)
            if e != epoch:
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
                epoch = e
            yield order[pos * self.batch_size:(pos + 1) * self.batch_size][self.rank_slice].tolist()


def make_views(batch, runtime: Runtime, resolution: int | None, flip: bool, interpolation: str = "bilinear",
               antialias: bool = True) -> Views:
    """Move a (images, labels, idx[, cached]) batch to the device, flip it, and degrade it to resolution x
    resolution; `cached` (teacher_cache.CachedDataset) holds both flips' teacher outputs: the drawn one is kept.

    A rank's batch is its slice of the global batch: the coins are drawn for the global batch and sliced.
    """
    from ..data import degrade, from_uint8
    images, labels, idx = (t.to(runtime.device, non_blocking=True) for t in batch[:3])
    if images.dtype == torch.uint8:  # datasets opened as_uint8 ship raw pixels; convert on the device
        images = from_uint8(images)
    coins = None
    if flip:  # one coin per sample, shared by the HR and LR views (docs/method/training.md)
        local = images.shape[0]
        coins = torch.rand(local * runtime.world_size, device=images.device)[runtime.rank * local:][:local] < 0.5
        images = torch.where(coins[:, None, None, None], images.flip(-1), images)
    lr = images if resolution is None else degrade(images, resolution, mode=interpolation, antialias=antialias)
    cached = {} if len(batch) < 4 else pick_flip(
        {k: v.to(runtime.device, non_blocking=True) for k, v in batch[3].items()}, coins)
    return Views(images, lr, labels.long(), idx.long(), cached.get("tap"), cached.get("embedding"))


class Trainer:
    """Runs one Stage: `train_steps(n)` advances n optimizer steps; `save`/`resume` round-trip all state."""

    def __init__(self, stage: Stage, dataset: Dataset, runtime: Runtime, optim: OptimConfig, *, batch_size: int,
                 seed: int = 0, resolution: int | None = 16, flip: bool = True, interpolation: str = "bilinear",
                 antialias: bool = True, num_workers: int = 0, output_dir: str | Path | None = None,
                 log_every: int = 50, checkpoint_every: int = 0, progress: bool = True, name: str | None = None,
                 group_optims: dict[str, OptimizerConfig | None] | None = None, shard_banks: bool = False,
                 sync_batchnorm: bool = False, scalars=None, step_hooks: Sequence[Callable] = (),
                 meta: dict | None = None, teacher_cache: TeacherCache | None = None):
        self.stage, self.dataset, self.runtime = stage.to(runtime.device), dataset, runtime
        if runtime.device.type == "cuda":  # the frozen teachers, when they run live, in the GPU's faster layout
            stage.teachers_channels_last()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.view_args = dict(resolution=resolution, flip=flip, interpolation=interpolation, antialias=antialias)
        if teacher_cache is not None:  # the frozen teachers' outputs read beside each image, checked first
            self.dataset = teacher_cache.dataset_for(stage, dataset, self.view_args)
        self.steps_per_epoch = len(dataset) // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the dataset size {len(dataset)}")
        if optim.steps is not None:
            self.total_steps = optim.steps
            milestones = [round(m * optim.steps / optim.epochs) for m in optim.milestones]
        else:
            self.total_steps = optim.epochs * self.steps_per_epoch
            milestones = [m * self.steps_per_epoch for m in optim.milestones]
        if runtime.world_size > 1 and getattr(stage, "distill", None) is not None:
            # banks / queues get the global batch's update; shard_banks splits CRD's banks over the ranks
            stage.distill = to_distributed(stage.distill, sharded=shard_banks)
        if runtime.world_size > 1 and sync_batchnorm:  # before the optimizer: it must see the new modules
            to_sync_batchnorm(stage, runtime.device)
        # forward through DDP (gradient averaging); state, saving and eval use the plain stage
        self.model = wrap_ddp(stage, runtime.device) if runtime.world_size > 1 else stage
        # the stage's named parameter groups; a group named in group_optims gets an optimizer of its own
        groups = stage.param_groups()
        own = {name: cfg for name, cfg in (group_optims or {}).items() if cfg is not None and groups.get(name)}
        shared = [p for name, params in groups.items() if name not in own for p in params]
        if not shared and not own:
            raise ValueError(f"{stage.name} has no trainable parameters")
        self.optimizers = ([make_optimizer(shared, optim)] if shared else []) + \
            [make_optimizer(groups[name], cfg) for name, cfg in own.items()]
        self.schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, milestones, gamma=optim.gamma)
                           for o in self.optimizers]
        self.scaler = runtime.grad_scaler()
        self.step = 0
        self.history: list[dict[str, float]] = []  # loss terms of every step this process ran (for plots)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.log_every, self.checkpoint_every, self.progress = log_every, checkpoint_every, progress
        self.name = name or stage.name  # what the progress bar and the log call this run
        self.meta = dict(meta or {})  # what the run is (e.g. its variant): saved, and checked on resume
        self.log = logging.getLogger("gdrd_fast.train")
        # scalars: a validation.ScalarLogger (rank 0) for the logged loss terms; step_hooks: called as
        # hook(trainer, terms) after every step, e.g. validation.Validator
        self.scalars, self.step_hooks = scalars, list(step_hooks)

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stage": self.stage.name, "meta": self.meta, "step": self.step, "modules": self.stage.state_dict(),
                "optimizers": [o.state_dict() for o in self.optimizers],
                "schedulers": [s.state_dict() for s in self.schedulers],
                "scaler": self.scaler.state_dict(), "rng": ckpt.rng_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage") != self.stage.name:
            raise ValueError(f"checkpoint is for stage {state.get('stage')!r}, not {self.stage.name!r}")
        saved_meta = state.get("meta", {})
        clash = {k: (saved_meta[k], v) for k, v in self.meta.items() if k in saved_meta and saved_meta[k] != v}
        if clash:
            raise ValueError("checkpoint is from another run: " + ", ".join(
                f"{k} {saved!r} there, {ours!r} here" for k, (saved, ours) in clash.items()))
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(f"checkpoint has {len(state['optimizers'])} optimizer(s), this run builds "
                             f"{len(self.optimizers)}: is stage2.distill_optim set the same way?")
        self.stage.load_state_dict(state["modules"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        if self.runtime.world_size > 1 and self.runtime.device.type == "cuda" and state["rng"]["cuda"]:
            # rank 0 saved the GPU generator it drew from (cuda:0); every rank's draws ran in lockstep with it
            torch.cuda.set_rng_state(state["rng"]["cuda"][0], self.runtime.device)
        self.step = int(state["step"])

    def _shard_keys(self) -> list[str]:
        """State keys that hold only this rank's slice (ShardedMemoryBank rows)."""
        return [f"{name}.rows" for name, module in self.stage.named_modules() if isinstance(module, ShardedMemoryBank)]

    def save(self, path: str | Path | None = None) -> Path | None:
        """Atomic write by the main process (None elsewhere); call it on every rank. Sharded bank rows
        go to one file per rank beside it (<path>.rank<r>), written by their rank."""
        path = Path(path or self.output_dir / f"{self.stage.name}.pt")
        state = self.state_dict()
        shard = {key: state["modules"].pop(key) for key in self._shard_keys()}
        if shard:
            ckpt.save_checkpoint({"step": self.step, "world_size": self.runtime.world_size, "modules": shard},
                                 ckpt.shard_path(path, self.runtime.rank))
        if not self.runtime.is_main:
            return None
        ckpt.remove_shards(path, self.runtime.world_size if shard else 0)  # an earlier save's extra shards
        return ckpt.save_checkpoint(state, path)

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint (and its shard files), whether written sharded, replicated or by one process."""
        state = ckpt.load_checkpoint(path, map_location=self.runtime.device)
        shards = ckpt.load_shards(path, map_location=self.runtime.device)
        if shards:
            if any(s["step"] != state["step"] for s in shards):
                raise ValueError(f"the shard files of {path} are from other steps than the checkpoint")
            if self._shard_keys() and len(shards) == self.runtime.world_size:
                state["modules"].update(shards[self.runtime.rank]["modules"])
            else:  # another layout: reassemble whole banks; a sharded bank keeps its own slice of them
                for key in shards[0]["modules"]:
                    state["modules"][key] = torch.cat([s["modules"][key] for s in shards])
        self.load_state_dict(state)

    # --- training ----------------------------------------------------------------------------------
    def _loader(self, stop: int) -> DataLoader:
        sampler = StepBatchSampler(len(self.dataset), self.batch_size, self.seed, self.step, stop,
                                   self.runtime.rank, self.runtime.world_size)
        # its own generator: a loader drawing its worker seed from the global RNG would shift the flips
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.step)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          pin_memory=self.runtime.device.type == "cuda", generator=generator,
                          worker_init_fn=signals.quiet_worker if self.num_workers else None)

    def _mean_over_ranks(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The loss terms as logged: DDP averages gradients, so the global loss is the ranks' mean."""
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self.runtime.world_size > 1:
            dist.all_reduce(values)
            values /= self.runtime.world_size
        return dict(zip(terms, values.tolist()))

    def train_steps(self, n: int | None = None) -> dict[str, float]:
        """Run n steps (default: to the end of the schedule); returns the last step's loss terms."""
        stop = self.total_steps if n is None else min(self.step + n, self.total_steps)
        self.stage.train()
        terms_out: dict[str, float] = {}
        bar = tqdm(total=stop - self.step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and self.runtime.is_main))
        start_time, start_step = time.perf_counter(), self.step
        batches = iter(self._loader(stop))
        try:
            for batch in batches:
                views = make_views(batch, self.runtime, **self.view_args)
                terms = self.model(views)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.stage.name} step {self.step}: loss is {float(loss)} "
                                             f"({ {k: float(v) for k, v in terms.items()} })")
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                for optimizer in self.optimizers:
                    self.scaler.step(optimizer)
                self.scaler.update()
                for scheduler in self.schedulers:
                    scheduler.step()
                self.step += 1
                terms_out = self._mean_over_ranks(terms | {"loss": loss})
                self.history.append({"step": self.step} | terms_out)
                rate = (self.step - start_step) * self.batch_size / max(time.perf_counter() - start_time, 1e-9)
                bar.set_postfix({k: f"{v:.4g}" for k, v in terms_out.items()} | {"samples/s": f"{rate:.1f}"})
                bar.update()
                if self.log_every and self.runtime.is_main and (self.step % self.log_every == 0 or self.step == stop):
                    eta = (stop - self.step) * self.batch_size / rate
                    self.log.info("%s step %d/%d %s lr %.4g samples/s %.1f eta %.0fs", self.name, self.step,
                                  self.total_steps, " ".join(f"{k} {v:.5g}" for k, v in terms_out.items()),
                                  self.schedulers[0].get_last_lr()[0], rate, eta)
                    if self.scalars is not None:
                        self.scalars.add(self.stage.name, self.step, terms_out)
                # the hooks (validation, best.pt, metrics) are part of the step: the step's checkpoint comes
                # after them, so a run killed during them resumes before the step and runs them again
                for hook in self.step_hooks:
                    hook(self, terms_out)
                saved = bool(self.checkpoint_every and self.output_dir and self.step % self.checkpoint_every == 0)
                if saved:
                    self.save()
                if self.stop_requested():
                    self._stop(saved)
        finally:
            # the workers stop now: an exception's traceback holds the iterator (torch's frames) until the
            # interpreter exits, and multiprocessing's exit hook cannot end workers that ignore SIGTERM
            shutdown = getattr(batches, "_shutdown_workers", None)  # absent without workers
            if shutdown is not None:
                shutdown()
            bar.close()
        return terms_out

    def stop_requested(self) -> bool:
        """Whether a signal asked the run to stop (signals.stop_gracefully); under torchrun, on any rank."""
        flag = signals.requested() is not None
        if self.runtime.world_size > 1:
            flag_t = torch.tensor([float(flag)], device=self.runtime.device)
            dist.all_reduce(flag_t, op=dist.ReduceOp.MAX)
            flag = bool(flag_t.item())
        return flag

    def _stop(self, saved: bool) -> None:
        """Checkpoint the step just finished (unless done already) and stop the run."""
        signum = signals.requested() or signal.SIGTERM  # a rank that did not see the signal itself
        if self.output_dir is None:
            raise signals.StopRequested(signum, f"{self.name}: stopped after step {self.step} (no output_dir: "
                                                "nothing saved)")
        path = Path(self.output_dir) / f"{self.stage.name}.pt"
        if not saved:
            self.save(path)
        self.log.info("%s: stopped by %s after step %d; checkpoint %s", self.name, signal.Signals(signum).name,
                      self.step, path)
        raise signals.StopRequested(signum, f"{self.name}: stopped after step {self.step}; continue with "
                                            f"--resume {path}")


def make_optimizer(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def log_to_file(path: str | Path, runtime: Runtime) -> logging.Handler | None:
    """Send gdrd_fast.* log records to `path` (main process only); returns the handler to remove later."""
    if not runtime.is_main:
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("gdrd_fast")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
