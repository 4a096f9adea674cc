"""The "Switching from ..." pages (docs/switching/): each page's snippet runs as written, against a
minimal re-implementation of the peer project's formula written here (no peer code is copied)."""
from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

PAGES = Path(__file__).resolve().parents[1] / "docs" / "switching"


def snippet(page: str) -> str:
    """The page's runnable code: its python blocks that start with an import, in order."""
    blocks = re.findall(r"```python\n(.*?)```", (PAGES / page).read_text(), flags=re.S)
    code = "\n".join(b for b in blocks if b.startswith(("import", "from")))
    assert code, f"{page} has no runnable python block"
    return code


def run_snippet(page: str, **names) -> dict:
    namespace = dict(names)
    exec(compile(snippet(page), str(PAGES / page), "exec"), namespace)
    return namespace


# ---------------------------------------------------------------------------------------------------
# MoCo
# ---------------------------------------------------------------------------------------------------
def moco_formula(q, k, queue, temperature=0.07):
    """MoCo's loss: cross-entropy of [q.k, q.queue] / T with target 0 (queue: the keys enqueued so far)."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def _moco_batches(steps, world, batch, dim, seed):
    g = torch.Generator().manual_seed(seed)
    return [[(F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1),
              F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1))
             for _ in range(world)] for _ in range(steps)]


def _moco_run(rank, world, batches, size, dim):
    """(per-step |ours - MoCo|, |dq ours - dq MoCo|, the final queue) on this rank."""
    ns = run_snippet("moco.md", K=size, dim=dim)
    moco_queue = torch.zeros(0, dim, dtype=torch.float64)
    loss_err, grad_err = [], []
    for step in batches:
        q, k = step[rank][0].clone().requires_grad_(), step[rank][1]
        ours = ns["moco_loss"](q, k)
        want = moco_formula(q, k, moco_queue)
        (g_ours,) = torch.autograd.grad(ours, q)
        (g_want,) = torch.autograd.grad(want, q)
        loss_err.append(abs(float(ours.detach()) - float(want.detach())))
        grad_err.append(float((g_ours - g_want).abs().max()))
        # MoCo enqueues all ranks' keys (concat_all_gather, rank order) into a float32 buffer
        keys = torch.cat([s[1] for s in step]).float().double()
        moco_queue = torch.cat([moco_queue, keys])[-size:]
    return loss_err, grad_err, ns["queue"].filled().clone()


def test_moco_snippet_gives_mocos_loss_from_an_empty_queue():
    size, dim = 12, 5
    batches = _moco_batches(6, 1, 4, dim, int(torch.randint(2 ** 31, (1,))))
    loss_err, grad_err, queue = _moco_run(0, 1, batches, size, dim)
    assert max(loss_err) < 1e-12 and max(grad_err) < 1e-12
    assert loss_err[0] == 0.0  # the first step has no negatives at all: MoCo's loss is 0 too
    assert torch.equal(queue.double().sort(0).values,
                       torch.cat([s[0][1] for s in batches]).float().double()[-size:].sort(0).values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moco_rank(rank, world, port, out_dir, batches, size, dim):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _moco_run(rank, world, batches, size, dim)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_moco_snippet_under_two_gloo_processes_gathers_keys_in_rank_order(tmp_path):
    size, dim, world = 16, 5, 2
    batches = _moco_batches(5, world, 4, dim, int(torch.randint(2 ** 31, (1,))))
    mp.spawn(_moco_rank, args=(world, _free_port(), str(tmp_path), batches, size, dim), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for loss_err, grad_err, _ in results:
        assert max(loss_err) < 1e-12 and max(grad_err) < 1e-12
    assert torch.equal(results[0][2], results[1][2])  # every rank holds the same queue
    keys = torch.cat([k for step in batches for _, k in step]).float()
    assert torch.equal(results[0][2], torch.roll(keys[-size:], len(keys) % size, 0))  # ring slot order


def test_memory_queue_labels_are_opt_in_and_filled_grows():
    from gdrd_fast import MemoryQueue

    queue = MemoryQueue(5, 3)
    assert queue.labels is None and queue.filled().shape == (0, 3)
    rows = torch.randn(7, 3)
    queue.push_(rows[:2])
    assert torch.equal(queue.filled(), rows[:2]) and queue.filled().data_ptr() == queue.values.data_ptr()
    state = {k: v.clone() for k, v in queue.state_dict().items()}
    with pytest.raises(ValueError, match="with_labels=True"):
        queue.push_(rows[:1], torch.tensor([3]))
    assert all(torch.equal(v, state[k]) for k, v in queue.state_dict().items())
    queue.push_(rows[2:7])  # wraps: slots hold rows 5, 6, 2, 3, 4
    assert torch.equal(queue.filled(), torch.stack([rows[5], rows[6], rows[2], rows[3], rows[4]]))
    assert torch.equal(queue.filled(skip_newest=2), rows[2:5])  # oldest first
    with pytest.raises(ValueError, match="skip_newest"):
        queue.filled(skip_newest=6)
    labelled = MemoryQueue(4, 2, with_labels=True)
    labelled.push_(torch.randn(3, 2), torch.tensor([7, 8, 9]))
    assert torch.equal(labelled.filled_labels(), torch.tensor([7, 8, 9]))
    assert torch.equal(labelled.filled_labels(skip_newest=1), torch.tensor([7, 8]))
    with pytest.raises(ValueError, match="no labels"):
        queue.filled_labels()

